//! The iptables backend: the same plan as the nftables backend, rendered as iptables chains in
//! the `nat` and `filter` tables (for nodes where nftables cannot be used), applied with
//! `iptables-restore --noflush` through iptables-legacy or iptables-nft ([`detect`]).

pub mod apply;
pub mod detect;
pub mod incremental;
pub mod render;

pub use apply::{Iptables, IptablesCommand, IptablesError};
pub use detect::Variant;
pub use render::{Ruleset, render};
