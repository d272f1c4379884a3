#![no_std]
// This file exists to enable the library target: rulebpf-loader depends on this
// crate (so cargo rebuilds the hook when it changes) and needs a lib to link.
