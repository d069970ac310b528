//! The gateway's own accounting, read from its `/status`: what every frame it read became. Shared
//! by the root tests and `portcullis-bench soak`, which assert it exactly.

use std::time::Duration;

use gateway::metrics::Status;
use gateway::stats::{CtEvent, Reason};

use crate::process::GatewayProcess;
use crate::LabError;

/// Totals over every worker, from one `/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accounting {
    pub rx: u64,
    pub tx: u64,
    pub drops: u64,
    pub l2_forwarded: u64,
    /// Drops decided before the table: malformed frames and the L2 policy.
    pub unclassified_drops: u64,
    /// Frames counted under a rule.
    pub hits: u64,
    /// Frames the connection tracker passed without the table.
    pub tracked: u64,
}

impl Accounting {
    pub fn of(s: &Status) -> Accounting {
        let t = &s.totals;
        let drop = |r: Reason| t.drop_count(r);
        Accounting {
            rx: t.rx_ingress + t.rx_egress,
            tx: t.tx_ingress + t.tx_egress,
            drops: Reason::ALL.iter().map(|r| drop(*r)).sum(),
            l2_forwarded: t.l2_forwarded,
            unclassified_drops: Reason::ALL
                .iter()
                .filter(|r| !r.after_classification())
                .map(|r| drop(*r))
                .sum(),
            hits: s.rules.iter().map(|r| r.hits).sum(),
            tracked: t.ct_count(CtEvent::Established) + t.ct_count(CtEvent::Related),
        }
    }

    /// What happened between `before` and `self`.
    pub fn since(&self, before: &Accounting) -> Accounting {
        Accounting {
            rx: self.rx - before.rx,
            tx: self.tx - before.tx,
            drops: self.drops - before.drops,
            l2_forwarded: self.l2_forwarded - before.l2_forwarded,
            unclassified_drops: self.unclassified_drops - before.unclassified_drops,
            hits: self.hits - before.hits,
            tracked: self.tracked - before.tracked,
        }
    }

    /// The two identities the gateway promises, or what breaks them: every frame read was
    /// forwarded or dropped under exactly one reason, and every frame that reached the table
    /// (not passed by the tracker, not dropped or forwarded before it) was counted under exactly
    /// one rule.
    pub fn check(&self) -> Result<(), String> {
        if self.rx != self.tx + self.drops {
            return Err(format!(
                "rx {} != tx {} + drops {}: {self:?}",
                self.rx, self.tx, self.drops
            ));
        }
        let classified = self.rx - self.l2_forwarded - self.unclassified_drops - self.tracked;
        if self.hits != classified {
            return Err(format!(
                "rule hits {} != frames the table decided {classified}: {self:?}",
                self.hits
            ));
        }
        Ok(())
    }
}

/// The status once the counters stop moving (workers flush after each busy burst), within 5 s.
pub fn settled_status(gw: &GatewayProcess) -> Result<Status, LabError> {
    let traffic = |s: &Status| {
        let t = &s.totals;
        let drops: u64 = t.drops.iter().map(|(_, n)| n).sum();
        (
            t.rx_ingress + t.rx_egress,
            t.tx_ingress + t.tx_egress,
            drops,
        )
    };
    let mut last = gw.status()?;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let now = gw.status()?;
        if traffic(&now) == traffic(&last) {
            return Ok(now);
        }
        last = now;
    }
    Err(LabError::Unsettled(format!("{:?}", last.totals)))
}
