//! A fixed pool of CPU worker threads for the write path (hash, compress,
//! seal).
//!
//! Batches used to take a semaphore permit and then `spawn_blocking`.
//! Between two batches a permit waited for a blocking thread to wake up,
//! and after one for an async worker to poll the finished task: on a full
//! backup of the bench cluster a quarter of the permits' time went to
//! those hand-offs, and the cores sat idle for it. Here a worker takes the
//! next queued job itself as soon as it has finished one. The queue holds
//! only what callers put in flight (each stream bounds its own batches),
//! so it needs no bound of its own.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use super::error::{RepoError, Result};

type Job = Box<dyn FnOnce() + Send>;

/// `n` threads running queued jobs in order. The threads end when the
/// pool is dropped and the queue is empty.
pub struct Workers {
    queue: Sender<Job>,
}

impl Workers {
    pub fn new(n: usize) -> Result<Self> {
        let (queue, jobs) = channel::<Job>();
        let jobs = Arc::new(Mutex::new(jobs));
        for i in 0..n.max(1) {
            let jobs = jobs.clone();
            std::thread::Builder::new()
                .name(format!("pgcairn-cpu-{i}"))
                .spawn(move || work(&jobs))
                .map_err(|e| RepoError::Task(format!("starting a CPU worker thread: {e}")))?;
        }
        Ok(Workers { queue })
    }

    /// Run `f` on a worker and wait for its result.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.queue
            .send(Box::new(move || {
                // The caller may have gone (its backup failed elsewhere).
                let _ = tx.send(f());
            }))
            .map_err(|_| RepoError::Task("the CPU workers have stopped".into()))?;
        rx.await
            .map_err(|_| RepoError::Task("a CPU worker's job panicked".into()))
    }
}

fn work(jobs: &Mutex<Receiver<Job>>) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        match job {
            // A panicking job drops its result sender, which its caller
            // sees as an error; the worker goes on with the next job.
            Ok(job) => {
                let _ = catch_unwind(AssertUnwindSafe(job));
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_and_a_panic_is_an_error_not_a_lost_worker() {
        let w = Workers::new(1).unwrap();
        assert_eq!(w.run(|| 6 * 7).await.unwrap(), 42);
        let err = w.run(|| -> u32 { panic!("boom") }).await.unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        // The single worker survived the panic.
        assert_eq!(w.run(|| "still here").await.unwrap(), "still here");
    }

    #[tokio::test]
    async fn two_workers_run_two_jobs_at_once() {
        let w = Workers::new(2).unwrap();
        let gate = Arc::new(std::sync::Barrier::new(2));
        let (a, b) = (gate.clone(), gate.clone());
        // Each job waits for the other: one worker alone would never
        // finish them (the timeout only turns that hang into a failure).
        let both = async { tokio::join!(w.run(move || a.wait()), w.run(move || b.wait())) };
        let (x, y) = tokio::time::timeout(std::time::Duration::from_secs(60), both)
            .await
            .expect("both jobs finish");
        assert!(x.is_ok() && y.is_ok());
    }
}
