//! What portcullis does at the TCP level, below HTTP: who the client is behind a load
//! balancer ([`proxy_protocol`]) and keeping quiet connections alive through NAT and
//! firewalls ([`keepalive`]).

pub mod keepalive;
pub mod proxy_protocol;
