//! Builds the XDP programs in router-ebpf with the nightly toolchain and
//! bpf-linker (see `cargo xtask setup`); the objects land in OUT_DIR and are
//! embedded with `include_bytes_aligned!`. Set AYA_BUILD_SKIP=1 to run
//! `cargo check`/clippy without the eBPF toolchain.
fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../router-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "router-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
