//! The share table: which pool each of a service's share buckets sends
//! unmatched clients to, and share changes that keep the rest in
//! proportion.
//!
//! The table is weighted rendezvous hashing over the buckets: bucket `b`
//! goes to the pool with the smallest `-ln(u(b, pool)) / share`, where `u`
//! is a hash of the bucket and the pool's *name* mapped into (0, 1]. So:
//! - a pool's expected part of the buckets is exactly its share;
//! - the table depends on the names and shares only, not on the order
//!   the pools are written in, and is the same on every node;
//! - when one pool's share grows and the others shrink in proportion,
//!   each bucket either stays or moves into the growing pool (its score
//!   falls; every other score grows by the same factor, so their order
//!   holds), and the reverse for a shrinking pool: a share change moves
//!   only the clients it must.

use router_common::pools::SHARE_BUCKETS;

/// A share change that cannot be made; nothing changes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShareError {
    #[error("share {0} is above 100 percent")]
    AboveHundred(u32),
    #[error("{0} is the only pool; its share stays 100")]
    OnlyPool(String),
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Pool index (into `pools`) of every share bucket, for pools given as
/// (name, share in percent). Buckets go only to pools with a share above
/// 0; with no such pool every bucket names pool 0 (the config refuses
/// that state, and a runtime change cannot reach it).
pub fn share_table(pools: &[(&str, u32)]) -> Vec<u8> {
    let seeds: Vec<u64> = pools.iter().map(|(n, _)| fnv1a(n.as_bytes())).collect();
    (0..SHARE_BUCKETS)
        .map(|bucket| {
            let mut best: Option<(f64, usize)> = None;
            for (i, ((_, share), seed)) in pools.iter().zip(&seeds).enumerate() {
                if *share == 0 {
                    continue;
                }
                let h = mix64(seed ^ mix64(u64::from(bucket) + 1));
                // 53 random bits, shifted into (0, 1]: ln never sees 0.
                let u = ((h >> 11) + 1) as f64 / (1u64 << 53) as f64;
                let score = -u.ln() / f64::from(*share);
                if best.is_none_or(|(s, _)| score < s) {
                    best = Some((score, i));
                }
            }
            best.map_or(0, |(_, i)| i as u8)
        })
        .collect()
}

/// The shares after setting pool `index` to `share`: the other pools
/// that take unmatched clients now keep their proportions among themselves
/// and share what is left, so the total stays 100 (largest remainders,
/// ties to the earlier pool). If none of them takes any now, what is left
/// goes by `configured` shares, and failing those, equally.
pub fn set_share(
    current: &[u32],
    configured: &[u32],
    names: &[&str],
    index: usize,
    share: u32,
) -> Result<Vec<u32>, ShareError> {
    if share > 100 {
        return Err(ShareError::AboveHundred(share));
    }
    if current.len() == 1 {
        if share == 100 {
            return Ok(vec![100]);
        }
        return Err(ShareError::OnlyPool(
            names.first().copied().unwrap_or_default().to_owned(),
        ));
    }
    let others = |shares: &[u32]| -> Vec<u64> {
        shares
            .iter()
            .enumerate()
            .map(|(i, s)| if i == index { 0 } else { u64::from(*s) })
            .collect()
    };
    let mut basis = others(current);
    if basis.iter().all(|&w| w == 0) {
        basis = others(configured);
    }
    if basis.iter().all(|&w| w == 0) {
        basis = (0..current.len()).map(|i| u64::from(i != index)).collect();
    }
    let rest = u64::from(100 - share);
    let total: u64 = basis.iter().sum();
    let mut out: Vec<u32> = basis.iter().map(|w| (w * rest / total) as u32).collect();
    let mut left = rest - out.iter().map(|&s| u64::from(s)).sum::<u64>();
    let mut by_remainder: Vec<usize> = (0..basis.len()).filter(|&i| basis[i] > 0).collect();
    by_remainder.sort_by_key(|&i| std::cmp::Reverse(basis[i] * rest % total));
    for i in by_remainder {
        if left == 0 {
            break;
        }
        out[i] += 1;
        left -= 1;
    }
    out[index] = share;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fractions(table: &[u8], pools: usize) -> Vec<f64> {
        let mut n = vec![0usize; pools];
        for &p in table {
            n[p as usize] += 1;
        }
        n.iter().map(|&c| c as f64 / table.len() as f64).collect()
    }

    #[test]
    fn buckets_follow_the_shares() {
        // 16,384 buckets: the binomial spread of a share is at most 0.39
        // points (√(0.25/16384)); 1.5 points is past 3σ.
        for shares in [[80, 20, 0], [95, 5, 0], [50, 30, 20], [34, 33, 33]] {
            let pools = [
                ("stable", shares[0]),
                ("canary", shares[1]),
                ("spare", shares[2]),
            ];
            let f = fractions(&share_table(&pools), 3);
            for (got, want) in f.iter().zip(shares) {
                assert!(
                    (got * 100.0 - f64::from(want)).abs() < 1.5,
                    "{shares:?}: got {f:?}"
                );
            }
        }
    }

    #[test]
    fn a_zero_share_gets_no_bucket_and_order_does_not_matter() {
        let a = share_table(&[("stable", 100), ("canary", 0)]);
        assert!(a.iter().all(|&p| p == 0));
        let ab = share_table(&[("stable", 70), ("canary", 30)]);
        let ba = share_table(&[("canary", 30), ("stable", 70)]);
        assert!(ab.iter().zip(&ba).all(|(x, y)| *x == 1 - *y));
    }

    #[test]
    fn growing_a_share_moves_clients_only_into_that_pool() {
        let names = ["stable", "canary", "spare"];
        let before = [60, 10, 30];
        let after = set_share(&before, &before, &names, 1, 40).unwrap();
        assert_eq!(after, vec![40, 40, 20]);
        let t0 = share_table(&[("stable", 60), ("canary", 10), ("spare", 30)]);
        let t1 = share_table(&[("stable", 40), ("canary", 40), ("spare", 20)]);
        let mut moved = 0;
        for (a, b) in t0.iter().zip(&t1) {
            if a != b {
                assert_eq!(
                    *b, 1,
                    "a bucket moved from pool {a} to {b}, not into canary"
                );
                moved += 1;
            }
        }
        // About 30% of the buckets had to move; no more than that.
        let share = moved as f64 / t0.len() as f64;
        assert!((0.27..0.33).contains(&share), "{share}");
        // And back: shrinking moves clients only out of canary.
        for (a, b) in t1.iter().zip(&t0) {
            if a != b {
                assert_eq!(*a, 1);
            }
        }
    }

    #[test]
    fn set_share_keeps_the_total_and_the_proportions() {
        let names = ["a", "b"];
        assert_eq!(
            set_share(&[95, 5], &[95, 5], &names, 1, 20),
            Ok(vec![80, 20])
        );
        assert_eq!(
            set_share(&[80, 20], &[95, 5], &names, 1, 100),
            Ok(vec![0, 100])
        );
        // Rolled back from 100: the rest goes by the configured shares.
        assert_eq!(
            set_share(&[0, 100], &[95, 5], &names, 1, 0),
            Ok(vec![100, 0])
        );
        let three = ["a", "b", "c"];
        assert_eq!(
            set_share(&[50, 25, 25], &[50, 25, 25], &three, 0, 0),
            Ok(vec![0, 50, 50])
        );
        // Nothing configured either: equal parts, remainder to the first.
        assert_eq!(
            set_share(&[0, 0, 100], &[0, 0, 100], &three, 2, 1),
            Ok(vec![50, 49, 1])
        );
        assert_eq!(
            set_share(&[95, 5], &[95, 5], &names, 1, 101),
            Err(ShareError::AboveHundred(101))
        );
        assert_eq!(
            set_share(&[100], &[100], &["only"], 0, 50),
            Err(ShareError::OnlyPool("only".into()))
        );
    }
}
