//! The plumbing between the pipeline's threads: the message that ends a stream on purpose, and the
//! shared slot where the first error lands. A stage that sees its channel close without an
//! [`Item::End`] knows that another stage failed, so a failure anywhere can never be mistaken for a
//! finished video; the first error wins and raises the stop flag the other stages check.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::Error;

/// What travels through a channel: items, then an explicit end.
pub enum Item<T> {
    /// The next item.
    Next(T),
    /// The stream is complete (the sender succeeded).
    End,
}

/// The first error of any stage, and the stop flag it raises.
#[derive(Default)]
pub struct FirstError {
    error: Mutex<Option<Error>>,
    stop: AtomicBool,
}

impl FirstError {
    /// Keeps `error` unless an earlier one is already kept, and asks every stage to stop.
    pub fn record(&self, error: Error) {
        let mut slot = self.error.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            tracing::debug!(%error, "stopping the pipeline");
            *slot = Some(error);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Whether a stage has failed.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Records the error of a stage's result; `Some(value)` when the stage completed.
    pub fn settle<T>(&self, result: Result<Option<T>, Error>) -> Option<T> {
        match result {
            Ok(value) => value,
            Err(error) => {
                self.record(error);
                None
            }
        }
    }

    /// The error kept, if any.
    pub fn into_error(self) -> Option<Error> {
        self.error.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_error_wins() {
        let errors = FirstError::default();
        assert!(!errors.stopped());
        assert_eq!(errors.settle::<u8>(Ok(Some(3))), Some(3));
        errors.settle::<u8>(Err(Error::Settings("first".into())));
        errors.record(Error::Settings("second".into()));
        assert!(errors.stopped());
        assert!(errors.into_error().unwrap().to_string().contains("first"));
    }
}
