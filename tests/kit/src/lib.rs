//! The router's test kit: what its integration tests and its benchmarks are
//! built from. Network-namespace topologies ([`netns`]), packet builders
//! ([`packet`], [`raw_sender`]), the datapath's reference model ([`model`]),
//! the XDP program under BPF_PROG_TEST_RUN ([`xdp_fixture`], [`test_run`]),
//! the fixture scripts ([`fixtures`], [`replica`]), the fake NVML library's
//! state ([`fake_nvml`]), a fake Kubernetes API server ([`fake_kube`]) and
//! the real daemon ([`daemon_proc`]).
pub mod bpffs;
pub mod daemon_proc;
pub mod fake_kube;
pub mod fake_nvml;
pub mod fixtures;
pub mod kernel_ns;
pub mod model;
pub mod netns;
pub mod packet;
pub mod packet6;
pub mod raw_sender;
pub mod replica;
pub mod test_run;
pub mod veth_xdp;
pub mod xdp_fixture;
