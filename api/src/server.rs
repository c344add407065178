//! [`serve`]: the router on a listener, until shutdown.

use tokio::net::TcpListener;

use crate::router;
use crate::state::AppState;

/// Serves the API on `listener` until `state.shutdown` fires, then stops accepting,
/// finishes the requests in flight and returns. WebSocket sessions watch the same token
/// and close themselves with a final close frame.
///
/// # Errors
/// The I/O error that stopped the server.
pub async fn serve(listener: TcpListener, state: AppState) -> std::io::Result<()> {
    let shutdown = state.shutdown.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
