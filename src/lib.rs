//! mesh-operator plans one bounded-degree, well-connected, low-churn mesh of supplementary CRDT sync links
//! for a fleet of build agents and hands each agent Pod its peers.
//!
//! Data flow: [`api`] (what users write) and [`presence`] (what the rendezvous says) feed the pure
//! [`planner`]; [`controller`] applies its plan to Pods; [`simulate`] measures it against the seed agents' own scheme; [`cli`] is the command line.
pub mod api;
/// The assignment format, shared with the agents (crate `agent-mesh`).
pub use agent_mesh::assignment;
pub mod cli;
pub mod controller;
pub mod duration;
pub mod inspect;
pub mod memory;
pub mod planner;
pub mod presence;
pub mod process;
pub mod simulate;
pub mod telemetry;
