//! What the API's latency examples share: a read model built from the fleet simulator
//! through the real dataflow, and the process's CPU time.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use delivertrack_dataflow::pipeline::{self, DataflowConfig};
use delivertrack_ingest::{FleetSimulator, SimulatorConfig};
use delivertrack_sinks::ReadModel;

/// The read model after `minutes` simulated minutes of a 200-courier city.
pub fn read_model(minutes: usize) -> ReadModel {
    let mut simulator = FleetSimulator::new(
        SimulatorConfig {
            couriers: 200,
            seed: 7,
            ..SimulatorConfig::default()
        },
        1_796_025_600_000,
    );
    let (mut input, mut output) = pipeline::start(DataflowConfig::default()).unwrap();
    let model = ReadModel::default();
    for epoch in 0..minutes {
        let mut events = if epoch == 0 {
            simulator.initial_events()
        } else {
            Vec::new()
        };
        events.extend(simulator.step(60_000));
        input.send(events).unwrap();
        model.apply(&output.recv().unwrap());
    }
    input.close();
    model
}

/// CPU time this process has used (user + system, every thread), from `/proc/self/stat`;
/// `None` where there is no procfs. Clock ticks are taken as 100 per second (Linux's
/// USER_HZ on every common platform).
pub fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}
