//! Graceful shutdown for answers in flight: when the grace period after SIGTERM or Ctrl-C
//! runs out, a stream still open ends with an error event and `[DONE]` instead of a cut
//! connection, and its generation stops.

use actix_web::web::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::watch;

use crate::error::DuetError;
use crate::openai::sse;

/// Flipped to `true` when the grace period is over.
pub type ShutdownSignal = watch::Receiver<bool>;

/// `body`, ended early (with an error event and `[DONE]`) once `shutdown` fires.
pub fn until_shutdown<S, E>(
    body: S,
    shutdown: ShutdownSignal,
) -> impl Stream<Item = Result<Bytes, E>>
where
    S: Stream<Item = Result<Bytes, E>> + 'static,
{
    let body = Box::pin(body);
    futures::stream::unfold(Some((body, shutdown)), |state| async move {
        let (mut body, mut shutdown) = state?;
        let ended = tokio::select! {
            biased;
            _ = shutdown.wait_for(|over| *over) => None,
            item = body.next() => Some(item),
        };
        match ended {
            None => {
                let mut last = sse::event(&DuetError::ShuttingDown.body()).to_vec();
                last.extend_from_slice(sse::DONE);
                Some((Ok(Bytes::from(last)), None))
            }
            Some(item) => item.map(|item| (item, Some((body, shutdown)))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_cut_by_shutdown_ends_with_an_error_event_and_done() {
        let (tx, rx) = watch::channel(false);
        let endless =
            futures::stream::repeat_with(|| Ok::<_, ()>(Bytes::from_static(b"data: {}\n\n")));
        let mut stream = Box::pin(until_shutdown(endless, rx));
        assert_eq!(
            stream.next().await.unwrap().unwrap(),
            Bytes::from_static(b"data: {}\n\n")
        );
        tx.send(true).unwrap();
        let last = stream.next().await.unwrap().unwrap();
        assert!(last.starts_with(b"data: {\"error\""));
        assert!(last.ends_with(b"data: [DONE]\n\n"));
        assert!(stream.next().await.is_none());
    }
}
