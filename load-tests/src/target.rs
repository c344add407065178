//! What the harness talks to: loopback only, checked before the first byte is sent.
//!
//! A load test is a denial of service by another name. The harness refuses any address
//! that is not a loopback one (127.0.0.0/8, `::1`, `localhost`) — for the API, RabbitMQ and
//! PostgreSQL alike — so a mistyped host never points it at someone else's server. It also
//! checks that the target answers before it starts, and says so in a sentence when it
//! does not.
//!
//! The server's memory is read from `/proc/<pid>/status` (`VmRSS`); the pid is given, or
//! found as the process that listens on the target's port (`/proc/net/tcp*` gives the
//! listening socket's inode, `/proc/*/fd` the process holding it).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use url::Url;

/// Why a target cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The url does not parse.
    #[error("{what} {url:?} is not a valid url: {reason}")]
    BadUrl {
        /// Which setting.
        what: &'static str,
        /// The url, passwords removed.
        url: String,
        /// Why.
        reason: String,
    },
    /// The host is not a loopback address.
    #[error(
        "{what} {host:?} is not a loopback address: load-tests sends traffic only to this \
         machine (127.0.0.1, ::1 or localhost)"
    )]
    NotLoopback {
        /// Which setting.
        what: &'static str,
        /// The host.
        host: String,
    },
    /// Nothing answers at the target.
    #[error("{what} at {url} is not up: {reason}")]
    NotUp {
        /// Which service.
        what: &'static str,
        /// Where it was looked for.
        url: String,
        /// What happened.
        reason: String,
    },
}

/// Checks that `url`'s host is a loopback address; returns the parsed url.
///
/// # Errors
/// [`TargetError::BadUrl`] or [`TargetError::NotLoopback`].
pub fn loopback_url(what: &'static str, url: &str) -> Result<Url, TargetError> {
    let parsed = Url::parse(url).map_err(|error| TargetError::BadUrl {
        what,
        url: redact(url),
        reason: error.to_string(),
    })?;
    let host = parsed.host_str().unwrap_or("").to_owned();
    if !is_loopback_host(&host, parsed.port_or_known_default().unwrap_or(0)) {
        return Err(TargetError::NotLoopback { what, host });
    }
    Ok(parsed)
}

/// Is `host` loopback? An IP literal must be; a name must be `localhost` or resolve only
/// to loopback addresses.
pub fn is_loopback_host(host: &str, port: u16) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return ip.is_loopback();
    }
    if bare.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match (bare, port).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

/// The url without its password, for messages.
pub fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparsable>".to_owned(),
    }
}

/// The API under test: its base url (`http://127.0.0.1:8080`) and WebSocket base.
#[derive(Clone, Debug)]
pub struct Target {
    base: Url,
}

impl Target {
    /// A target at `url`, which must be `http://` on a loopback host.
    ///
    /// # Errors
    /// Not a url, not http, or not loopback.
    pub fn new(url: &str) -> Result<Self, TargetError> {
        let base = loopback_url("the target", url)?;
        if base.scheme() != "http" {
            return Err(TargetError::BadUrl {
                what: "the target",
                url: redact(url),
                reason: "the target must be http:// (a local plain-text listener)".into(),
            });
        }
        Ok(Self { base })
    }

    /// `http://host:port` + `path`.
    pub fn http(&self, path: &str) -> String {
        format!("{}{}", self.origin("http"), path)
    }

    /// `ws://host:port` + `path`.
    pub fn ws(&self, path: &str) -> String {
        format!("{}{}", self.origin("ws"), path)
    }

    fn origin(&self, scheme: &str) -> String {
        let host = self.base.host_str().unwrap_or("127.0.0.1");
        match self.base.port_or_known_default() {
            Some(port) => format!("{scheme}://{host}:{port}"),
            None => format!("{scheme}://{host}"),
        }
    }

    /// The port the target listens on.
    pub fn port(&self) -> u16 {
        self.base.port_or_known_default().unwrap_or(80)
    }

    /// Fails with a clear message unless `GET /healthz` answers 200 within 3 s.
    ///
    /// # Errors
    /// [`TargetError::NotUp`].
    pub async fn check_up(&self, client: &reqwest::Client) -> Result<(), TargetError> {
        let url = self.http("/healthz");
        let not_up = |reason: String| TargetError::NotUp {
            what: "the DeliverTrack API",
            url: self.http(""),
            reason,
        };
        let answer = tokio::time::timeout(Duration::from_secs(3), client.get(&url).send())
            .await
            .map_err(|_| not_up("GET /healthz did not answer within 3 s".into()))?
            .map_err(|error| {
                not_up(format!(
                    "{} (start it with `delivertrack run`, or point --target at it)",
                    error_chain(&error)
                ))
            })?;
        if answer.status().is_success() {
            Ok(())
        } else {
            Err(not_up(format!("GET /healthz answered {}", answer.status())))
        }
    }

    /// Does the target serve `path` (anything but a 404 `route_not_found`) to a `method`
    /// request? Used to find which optional routes exist.
    pub async fn has_route(&self, client: &reqwest::Client, method: &str, path: &str) -> bool {
        let request = match method {
            "POST" => client
                .post(self.http(path))
                .header("content-type", "application/json")
                .body("{}"),
            _ => client.get(self.http(path)),
        };
        match request.timeout(Duration::from_secs(3)).send().await {
            Ok(answer) if answer.status() == reqwest::StatusCode::NOT_FOUND => {
                let body = answer.text().await.unwrap_or_default();
                !body.contains("route_not_found")
            }
            Ok(_) => true,
            Err(_) => false,
        }
    }
}

/// An error and its sources in one line.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The resident memory of process `pid`, KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The process listening on TCP `port` on a loopback or wildcard address, found through
/// `/proc` (this machine only).
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (field 9)
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let listening = *state == "0A";
            let on_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if listening && on_port {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let own = std::process::id();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(Path::new("/proc").join(pid.to_string()).join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path())
                && inodes
                    .iter()
                    .any(|inode| link.as_os_str() == inode.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`: 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU time (user + system) process `pid` has used, seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing paren.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the paren.
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some((user + system) as f64 / TICKS_PER_SECOND)
}

/// The pids whose command name is `name` (`beam.smp`, `postgres`, `redis-server`).
pub fn pids_named(name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
        })
        .collect()
}

/// CPU seconds used so far by each part of the system under test on this machine: the
/// service, the harness itself, RabbitMQ, PostgreSQL (every backend), Redis. Two readings
/// apart give where the cores went in between.
pub fn cpu_by_component(server: Option<u32>) -> Vec<(&'static str, f64)> {
    let sum = |pids: Vec<u32>| pids.into_iter().filter_map(cpu_seconds).sum::<f64>();
    let mut parts = vec![
        ("load-tests", cpu_seconds(std::process::id()).unwrap_or(0.0)),
        ("rabbitmq", sum(pids_named("beam.smp"))),
        ("postgresql", sum(pids_named("postgres"))),
        ("redis", sum(pids_named("redis-server"))),
    ];
    if let Some(pid) = server {
        parts.insert(0, ("delivertrack", cpu_seconds(pid).unwrap_or(0.0)));
    }
    parts
}

/// The loopback address, for listeners the harness opens itself.
pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_are_accepted() {
        assert!(loopback_url("t", "http://127.0.0.1:8080").is_ok());
        assert!(loopback_url("t", "http://127.3.4.5:8080").is_ok());
        assert!(loopback_url("t", "http://[::1]:8080").is_ok());
        assert!(loopback_url("t", "http://localhost:8080").is_ok());
        assert!(loopback_url("t", "amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
        for remote in [
            "http://10.0.0.1:8080",
            "http://192.168.1.2",
            "http://0.0.0.0:8080",
            "amqp://guest:guest@8.8.8.8:5672/%2f",
            "http://[2001:db8::1]:80",
        ] {
            let error = loopback_url("the target", remote).unwrap_err();
            assert!(matches!(error, TargetError::NotLoopback { .. }), "{remote}");
            assert!(error.to_string().contains("loopback"), "{error}");
        }
        assert!(matches!(
            Target::new("https://127.0.0.1:8443"),
            Err(TargetError::BadUrl { .. })
        ));
    }

    #[test]
    fn passwords_never_appear_in_messages() {
        let text = redact("amqp://guest:secret@127.0.0.1:5672/%2f");
        assert!(!text.contains("secret") && text.contains("***"), "{text}");
    }

    #[test]
    fn a_listener_of_this_process_is_not_mistaken_for_another_s() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // The harness skips its own pid: nothing else listens on this port.
        assert_eq!(pid_listening_on(port), None);
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        assert!(cpu_seconds(std::process::id()).is_some());
        assert!(
            cpu_by_component(None)
                .iter()
                .any(|(name, _)| *name == "load-tests")
        );
    }

    #[tokio::test]
    async fn a_target_that_is_not_up_is_named_in_a_sentence() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let target = Target::new(&format!("http://127.0.0.1:{port}")).unwrap();
        let error = target
            .check_up(&reqwest::Client::new())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("is not up") && error.contains("delivertrack run"),
            "{error}"
        );
    }
}
