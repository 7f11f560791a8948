#![allow(dead_code)]

pub mod dns;
