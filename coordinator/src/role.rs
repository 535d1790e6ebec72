//! What this coordinator is right now: leading (with the handle of its
//! service loop), a standby (knowing the leader's URL, or not), starting,
//! or stopped. The API reads it on every request, so a leader that steps
//! down stops answering workers the moment it does; `/readyz` reads it too.

use std::sync::Arc;

use tokio::sync::watch;

use crate::service::Handle;

#[derive(Debug, Clone)]
pub enum State {
    Starting,
    Leading { handle: Handle, term: u64 },
    Following { leader: Option<String> },
    Stopped,
}

/// Shared by the API, the HTTP endpoint and whatever runs the lease table.
#[derive(Clone, Debug)]
pub struct Role {
    state: Arc<watch::Sender<State>>,
    /// The URL clients are sent to while this coordinator leads.
    pub address: String,
}

impl Role {
    pub fn new(address: String) -> Self {
        Self { state: Arc::new(watch::Sender::new(State::Starting)), address }
    }

    pub fn get(&self) -> State {
        self.state.borrow().clone()
    }

    pub fn lead(&self, handle: Handle, term: u64) {
        crate::metrics::leading(true, term);
        self.state.send_replace(State::Leading { handle, term });
    }

    pub fn follow(&self, leader: Option<String>) {
        crate::metrics::leading(false, 0);
        // Our own address is never the leader a standby points to.
        let leader = leader.filter(|l| *l != self.address);
        self.state.send_replace(State::Following { leader });
    }

    pub fn stop(&self) {
        crate::metrics::leading(false, 0);
        self.state.send_replace(State::Stopped);
    }

    pub fn is_leading(&self) -> bool {
        matches!(*self.state.borrow(), State::Leading { .. })
    }

    /// Resolves once the role is [`State::Stopped`].
    pub async fn stopped(&self) {
        let mut rx = self.state.subscribe();
        // `self` holds the sender, so this cannot fail; if it ever did,
        // nothing could stop the role any more: say so and return.
        if rx.wait_for(|s| matches!(s, State::Stopped)).await.is_err() {
            tracing::error!("the coordinator's role channel closed; treating it as stopped");
        }
    }
}
