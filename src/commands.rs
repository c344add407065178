//! The API's write routes need an [`EventPublisher`]; this module adapts the two ways the
//! pipeline takes input to it.
//!
//! - [`RabbitCommands`] (`run`): the ingest crate's [`CommandPublisher`], which publishes to
//!   the events exchange and resolves on the broker's confirm. The event then travels the
//!   same way as any producer's: the ingest queue, decoding, the dataflow.
//! - [`InProcessCommands`] (`demo`): a clone of the in-process source's sender, beside the
//!   simulator's. The channel is bounded; a send that finds it full for longer than the
//!   bound is refused, never queued without limit.
//!
//! Either failure is a [`PublishError`], which the API answers `503 commands_unavailable`.

use std::sync::Arc;
use std::time::Duration;

use delivertrack_api::{EventPublisher, PublishError};
use delivertrack_dataflow::Event;
use delivertrack_ingest::InProcessSender;
use delivertrack_ingest::rabbitmq::{CommandPublishError, CommandPublisher};
use futures::FutureExt;
use futures::future::BoxFuture;

/// Commands published to RabbitMQ with confirms.
#[derive(Clone, Debug)]
pub struct RabbitCommands {
    publisher: Arc<CommandPublisher>,
}

impl RabbitCommands {
    /// Publishes through `publisher`.
    pub fn new(publisher: Arc<CommandPublisher>) -> Self {
        Self { publisher }
    }
}

impl EventPublisher for RabbitCommands {
    fn publish<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), PublishError>> {
        async move {
            self.publisher
                .publish(event)
                .await
                .map_err(|error| publish_error(&error))
        }
        .boxed()
    }
}

/// Commands sent into the in-process source, as the demo's simulator sends its events.
#[derive(Clone, Debug)]
pub struct InProcessCommands {
    sender: InProcessSender,
    /// How long a send may wait for room in the full channel.
    bound: Duration,
}

impl InProcessCommands {
    /// Sends through `sender`, waiting at most `bound` for room.
    pub fn new(sender: InProcessSender, bound: Duration) -> Self {
        Self { sender, bound }
    }
}

impl EventPublisher for InProcessCommands {
    fn publish<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), PublishError>> {
        async move {
            match tokio::time::timeout(self.bound, self.sender.send(event.clone())).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_closed)) => Err(PublishError::Unavailable(
                    "the pipeline has stopped taking input".into(),
                )),
                Err(_elapsed) => Err(PublishError::Unavailable(format!(
                    "the pipeline's input stayed full for {} ms",
                    self.bound.as_millis()
                ))),
            }
        }
        .boxed()
    }
}

/// A broker error as the API sees it: certainly not published, or perhaps.
fn publish_error(error: &CommandPublishError) -> PublishError {
    if error.maybe_published() {
        PublishError::Unconfirmed(error.to_string())
    } else {
        PublishError::Unavailable(error.to_string())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use delivertrack_dataflow::event::ZoneDeleted;
    use delivertrack_dataflow::{EventBody, EventId, ZoneId};
    use delivertrack_ingest::in_process;

    fn event(n: u64) -> Event {
        Event {
            event_id: EventId::new_random(),
            occurred_at: n as i64,
            body: EventBody::ZoneDeleted(ZoneDeleted {
                zone_id: ZoneId::new_random(),
            }),
        }
    }

    #[tokio::test]
    async fn the_in_process_publisher_is_bounded_and_reports_a_stopped_pipeline() {
        let (sender, source) = in_process(1);
        let commands = InProcessCommands::new(sender, Duration::from_millis(50));
        commands.publish(&event(1)).await.unwrap();
        // The channel is full and nobody reads: refused after the bound, not queued.
        let full = commands.publish(&event(2)).await.unwrap_err();
        assert!(
            matches!(&full, PublishError::Unavailable(m) if m.contains("full")),
            "{full:?}"
        );
        drop(source);
        let stopped = commands.publish(&event(3)).await.unwrap_err();
        assert!(
            matches!(&stopped, PublishError::Unavailable(m) if m.contains("stopped")),
            "{stopped:?}"
        );
    }
}
