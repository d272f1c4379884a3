//! What every object of this crate needs besides its programs: a panic
//! handler (never reached: the verifier refuses what could panic) and the
//! license (bpf_bind, bpf_set_retval and bpf_setsockopt are GPL-only).

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
