//! TEMPORARY stand-in until the weighted Maglev module lands.
pub struct MaglevBackend<'a> {
    pub key: &'a str,
    pub id: u32,
    pub weight: u32,
}
pub fn build(backends: &[MaglevBackend<'_>], size: u32) -> Vec<u32> {
    let total: u64 = backends.iter().map(|b| b.weight as u64).sum();
    if total == 0 {
        return vec![router_common::NO_BACKEND; size as usize];
    }
    let mut out = Vec::with_capacity(size as usize);
    let mut acc = vec![0u64; backends.len()];
    for _ in 0..size {
        let mut best = 0;
        for (i, b) in backends.iter().enumerate() {
            acc[i] += b.weight as u64;
            if acc[i] > acc[best] {
                best = i;
            }
        }
        acc[best] -= total;
        out.push(backends[best].id);
    }
    out
}
