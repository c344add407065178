//! The broker's own command-line tool, for tests that make the *broker* close a connection
//! (feature `test-support`, never in release builds).
//!
//! A [`TcpProxy`](crate::testing::TcpProxy) cut looks like a dead network; this is the other
//! case: RabbitMQ closing a connection it still has, with a reply code and a reason, as it
//! does when it shuts down or an operator runs `rabbitmqctl close_connection`. The source's
//! connection is found by the name it gives itself ([`RabbitConfig::connection_name`],
//! the `connection_name` client property), so a test closes exactly its own connection and
//! never one of a test running beside it.
//!
//! [`RabbitConfig::connection_name`]: super::RabbitConfig::connection_name

use std::path::PathBuf;
use std::time::Duration;

use tokio::process::Command;

/// Where `rabbitmqctl` usually lives when it is not on the `PATH`.
const USUAL_PLACES: [&str; 2] = ["/usr/sbin/rabbitmqctl", "/usr/lib/rabbitmq/bin/rabbitmqctl"];

/// How long one `rabbitmqctl` call may take (it starts an Erlang VM: about two seconds).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a `rabbitmqctl` call failed.
#[derive(Debug, thiserror::Error)]
pub enum RabbitmqctlError {
    /// It could not be started.
    #[error("could not run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// It ran and failed (not allowed to talk to the node, the node is down, ...).
    #[error("`rabbitmqctl {args}` failed ({status}): {stderr}")]
    Failed {
        /// The arguments.
        args: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// It did not finish within its bound.
    #[error("`rabbitmqctl {args}` took longer than {timeout:?}")]
    Timeout {
        /// The arguments.
        args: String,
        /// The bound.
        timeout: Duration,
    },
}

/// `rabbitmqctl` of the broker the tests use (it must run as a user allowed to talk to the
/// node: root, or the `rabbitmq` user).
#[derive(Clone, Debug)]
pub struct Rabbitmqctl {
    program: PathBuf,
}

impl Rabbitmqctl {
    /// The program named by `RABBITMQCTL`, else `rabbitmqctl` on the `PATH` or in its usual
    /// places; `None` if there is none, and the caller says plainly that it skips.
    pub fn find() -> Option<Self> {
        if let Some(named) = std::env::var_os("RABBITMQCTL").filter(|named| !named.is_empty()) {
            return Some(Self {
                program: named.into(),
            });
        }
        let on_path = std::env::var_os("PATH")
            .map(|path| {
                std::env::split_paths(&path)
                    .map(|dir| dir.join("rabbitmqctl"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        on_path
            .into_iter()
            .chain(USUAL_PLACES.iter().map(PathBuf::from))
            .find(|candidate| candidate.is_file())
            .map(|program| Self { program })
    }

    /// The Erlang process ids of the open connections whose client-provided name is exactly
    /// `name`.
    ///
    /// # Errors
    /// `rabbitmqctl` could not be run or failed.
    pub async fn connections_named(&self, name: &str) -> Result<Vec<String>, RabbitmqctlError> {
        let listing = self
            .run(&[
                "--quiet",
                "--no-table-headers",
                "list_connections",
                "pid",
                "client_properties",
            ])
            .await?;
        Ok(pids_named(&listing, name))
    }

    /// Makes the broker close the connection `pid` with `reason` (AMQP reply 320,
    /// `CONNECTION_FORCED`).
    ///
    /// # Errors
    /// `rabbitmqctl` could not be run or failed.
    pub async fn close_connection(&self, pid: &str, reason: &str) -> Result<(), RabbitmqctlError> {
        self.run(&["--quiet", "close_connection", pid, reason])
            .await
            .map(drop)
    }

    async fn run(&self, args: &[&str]) -> Result<String, RabbitmqctlError> {
        let joined = args.join(" ");
        let output = Command::new(&self.program)
            .args(args)
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(CALL_TIMEOUT, output)
            .await
            .map_err(|_elapsed| RabbitmqctlError::Timeout {
                args: joined.clone(),
                timeout: CALL_TIMEOUT,
            })?
            .map_err(|source| RabbitmqctlError::Spawn {
                program: self.program.display().to_string(),
                source,
            })?;
        if !output.status.success() {
            return Err(RabbitmqctlError::Failed {
                args: joined,
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// The pids of the lines of `list_connections pid client_properties` whose properties hold
/// the connection name `name` — the whole name, so that `x-commands` is not `x`. The table
/// shows a property as `{"connection_name","x"}` (RabbitMQ 3.10) or with its type,
/// `{"connection_name",longstr,"x"}`.
fn pids_named(listing: &str, name: &str) -> Vec<String> {
    let forms = [
        format!("{{\"connection_name\",\"{name}\"}}"),
        format!("{{\"connection_name\",longstr,\"{name}\"}}"),
    ];
    listing
        .lines()
        .filter(|line| forms.iter().any(|form| line.contains(form.as_str())))
        .filter_map(|line| line.split('\t').next())
        .map(|pid| pid.trim().to_owned())
        .filter(|pid| !pid.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connections_of_exactly_that_name_are_picked() {
        let listing = "<rabbit@mq.1.100.0>\t[{\"capabilities\",[{\"basic.nack\",true}]},{\"connection_name\",\"delivertrack-x\"},{\"product\",\"lapin\"}]\n\
            <rabbit@mq.1.200.0>\t[{\"connection_name\",longstr,\"delivertrack-x-commands\"}]\n\
            <rabbit@mq.1.300.0>\t[{\"product\",\"other\"}]\n";
        assert_eq!(
            pids_named(listing, "delivertrack-x"),
            vec!["<rabbit@mq.1.100.0>".to_owned()]
        );
        assert_eq!(
            pids_named(listing, "delivertrack-x-commands"),
            vec!["<rabbit@mq.1.200.0>".to_owned()]
        );
        assert!(pids_named(listing, "delivertrack").is_empty());
    }
}
