//! `rulebpf probe`.

use std::{fmt, net::SocketAddr};

use serde::Serialize;

use crate::ops::probe::Outcome;

/// `rulebpf probe`: what each connect() gave.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct ProbeReport {
    #[serde(skip)]
    pub destination: SocketAddr,
    pub outcomes: Vec<Outcome>,
}

impl ProbeReport {
    pub fn failures(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Failed { .. }))
            .count()
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dest = self.destination;
        for outcome in &self.outcomes {
            match outcome {
                Outcome::Connected { local_port } => {
                    writeln!(f, "{dest}: connected from origin port {local_port}")?
                }
                Outcome::Failed { error, .. } => writeln!(f, "{dest}: connect failed: {error}")?,
            }
        }
        Ok(())
    }
}
