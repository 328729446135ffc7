//! Shutdown signalling: every task gets a `Shutdown` and stops when it fires.
//!
//! A thin wrapper over a tokio watch channel so that a task can both check and await it.

use tokio::sync::watch;

/// Held by the owner of a group of tasks; dropping or triggering it stops them.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Handed to each task.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new trigger and the first receiver.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Tells every receiver to stop.
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
    /// A receiver for a new task.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// True once shutdown was triggered.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
    /// Completes when shutdown is triggered (or the trigger is dropped).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }
}
