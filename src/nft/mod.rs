//! The nftables backend: rendering a plan as svcproxy's tables.

pub mod apply;
pub mod incremental;
pub mod render;
pub mod syntax;

pub use render::{TABLE, render};
pub use syntax::Ruleset;
