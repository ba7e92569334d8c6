//! The UDP reuseport group across process generations: which positions of
//! the group belong to which generation's workers. Sans-IO: the plan is
//! data, handed from process to process at an upgrade, and the socket
//! selection program is built from it.
//!
//! The kernel numbers a reuseport group's sockets in the order they joined
//! and keeps those numbers as long as no socket leaves (a leaving socket's
//! slot is refilled with the last one). spooky therefore never lets a
//! socket leave while the group is in use: every process holds a
//! descriptor for every socket of the group and hands all of them to its
//! successor, so a generation that exits (or crashes) leaves its block of
//! positions in place, merely unread, and a later generation with the same
//! worker count reuses it.

use serde::{Deserialize, Serialize};

/// Generations a CID can name: QUIC-LB's config rotation codepoints 0..=6
/// (7 marks unroutable CIDs).
pub const GENERATIONS: u8 = 7;

/// Positions a group may span (7 generations of 256 workers fit).
pub const MAX_POSITIONS: u32 = GENERATIONS as u32 * 256;

/// A process that owns a block: its pid and its start time (field 22 of
/// `/proc/PID/stat`, in clock ticks since boot), so that a recycled pid is
/// not mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    pub start_time: u64,
}

/// Consecutive positions of the group serving one generation's workers:
/// worker `w` of `generation` reads position `base + w`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub generation: u8,
    pub base: u32,
    pub workers: u32,
    /// `None`: the owner is gone; the positions wait for a generation with
    /// the same worker count.
    pub owner: Option<Owner>,
}

/// The whole group: its blocks in position order, and the generation that
/// takes new connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPlan {
    pub blocks: Vec<Block>,
    pub newest: u8,
}

/// Why a generation cannot join the group.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error(
        "all {GENERATIONS} generations a connection ID can name are still serving connections: wait for the oldest to finish draining"
    )]
    NoFreeGeneration,
    #[error("the reuseport group would exceed {MAX_POSITIONS} sockets")]
    TooLarge,
    #[error("a generation needs at least one worker")]
    NoWorkers,
}

/// Where a new generation's workers go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub generation: u8,
    pub base: u32,
    /// True when the block's sockets already exist (handed over); false
    /// when the new process must bind `workers` sockets, which then join
    /// the group at positions `base..base + workers`.
    pub reused: bool,
}

impl GroupPlan {
    /// The plan of a process that binds the group alone.
    pub fn first(generation: u8, workers: u32, owner: Owner) -> Self {
        Self {
            blocks: vec![Block {
                generation,
                base: 0,
                workers,
                owner: Some(owner),
            }],
            newest: generation,
        }
    }

    /// Number of sockets in the group.
    pub fn size(&self) -> u32 {
        self.blocks
            .iter()
            .map(|b| b.base + b.workers)
            .max()
            .unwrap_or(0)
    }

    /// The blocks whose owner still runs.
    pub fn live(&self) -> impl Iterator<Item = &Block> {
        self.blocks.iter().filter(|b| b.owner.is_some())
    }

    /// The newest generation's block.
    pub fn newest_block(&self) -> Option<&Block> {
        self.live().find(|b| b.generation == self.newest)
    }

    /// Places a new generation of `workers` workers owned by `owner`: the
    /// next codepoint after the newest that no live block uses, in the
    /// first free block of the same size, else in new positions at the end.
    /// The plan's newest generation does not change until [`Self::promote`].
    pub fn place(&mut self, workers: u32, owner: Owner) -> Result<Placement, GroupError> {
        if workers == 0 {
            return Err(GroupError::NoWorkers);
        }
        let generation = (1..=GENERATIONS)
            .map(|step| (self.newest + step) % GENERATIONS)
            .find(|g| !self.live().any(|b| b.generation == *g))
            .ok_or(GroupError::NoFreeGeneration)?;
        if let Some(block) = self
            .blocks
            .iter_mut()
            .find(|b| b.owner.is_none() && b.workers == workers)
        {
            block.generation = generation;
            block.owner = Some(owner);
            return Ok(Placement {
                generation,
                base: block.base,
                reused: true,
            });
        }
        let base = self.size();
        if base + workers > MAX_POSITIONS {
            return Err(GroupError::TooLarge);
        }
        self.blocks.push(Block {
            generation,
            base,
            workers,
            owner: Some(owner),
        });
        Ok(Placement {
            generation,
            base,
            reused: false,
        })
    }

    /// Makes `generation` the one that takes new connections.
    pub fn promote(&mut self, generation: u8) {
        self.newest = generation;
    }

    /// Undoes [`Self::place`] for a generation that never became ready:
    /// positions it appended are forgotten (its sockets closed, and they
    /// were the last ones, so no other socket moved); a reused block is
    /// free again.
    pub fn withdraw(&mut self, placement: Placement) {
        if placement.reused {
            if let Some(b) = self.blocks.iter_mut().find(|b| b.base == placement.base) {
                b.owner = None;
            }
        } else {
            self.blocks.retain(|b| b.base != placement.base);
        }
    }

    /// Frees the blocks whose owner is gone. Returns whether any was.
    pub fn release_dead(&mut self, alive: impl Fn(Owner) -> bool) -> bool {
        let mut changed = false;
        for b in &mut self.blocks {
            if let Some(o) = b.owner
                && b.generation != self.newest
                && !alive(o)
            {
                b.owner = None;
                changed = true;
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(pid: u32) -> Owner {
        Owner { pid, start_time: 1 }
    }

    #[test]
    fn generations_cycle_and_skip_live_ones() {
        let mut plan = GroupPlan::first(5, 2, owner(1));
        let p = plan.place(2, owner(2)).unwrap();
        assert_eq!(
            p,
            Placement {
                generation: 6,
                base: 2,
                reused: false
            }
        );
        plan.promote(6);
        let p = plan.place(2, owner(3)).unwrap();
        assert_eq!(p.generation, 0, "wraps after 6");
        assert_eq!(p.base, 4);
        plan.promote(0);
        assert_eq!(plan.size(), 6);
        // Generation 5's owner exits: its block is reused by the next one.
        assert!(plan.release_dead(|o| o.pid != 1));
        let p = plan.place(2, owner(4)).unwrap();
        assert_eq!(
            p,
            Placement {
                generation: 1,
                base: 0,
                reused: true
            }
        );
        assert_eq!(plan.size(), 6, "no new positions");
    }

    #[test]
    fn a_different_worker_count_gets_new_positions() {
        let mut plan = GroupPlan::first(0, 2, owner(1));
        let p = plan.place(3, owner(2)).unwrap();
        plan.promote(p.generation);
        plan.release_dead(|o| o.pid == 2);
        let q = plan.place(4, owner(3)).unwrap();
        assert_eq!((q.base, q.reused), (5, false));
        assert_eq!(plan.size(), 9);
    }

    #[test]
    fn seven_live_generations_are_the_limit() {
        let mut plan = GroupPlan::first(0, 1, owner(0));
        for pid in 1..7 {
            let p = plan.place(1, owner(pid)).unwrap();
            plan.promote(p.generation);
        }
        assert_eq!(plan.place(1, owner(9)), Err(GroupError::NoFreeGeneration));
        assert_eq!(plan.place(0, owner(9)), Err(GroupError::NoWorkers));
    }

    #[test]
    fn withdraw_restores_the_plan() {
        let mut plan = GroupPlan::first(0, 2, owner(1));
        let before = plan.clone();
        let p = plan.place(2, owner(2)).unwrap();
        plan.withdraw(p);
        assert_eq!(plan, before);
        // A reused block becomes free again.
        let p = plan.place(2, owner(2)).unwrap();
        plan.promote(p.generation);
        plan.release_dead(|o| o.pid == 2);
        let q = plan.place(2, owner(3)).unwrap();
        assert!(q.reused);
        plan.withdraw(q);
        assert!(plan.blocks[0].owner.is_none());
        assert_eq!(plan.newest, p.generation);
    }

    #[test]
    fn the_newest_is_never_released() {
        let mut plan = GroupPlan::first(0, 2, owner(1));
        assert!(!plan.release_dead(|_| false));
        assert!(plan.newest_block().is_some());
    }
}
