//! The scheme the agents used before the operator (each picked its own peers), kept as the baseline every measurement is compared
//! with: each agent dials the first k eligible peers of the shared presence list, in list order. The cap
//! bounds only what an agent dials, so the first k agents accept a link from everyone else.

/// Dial lists by member index for members given in presence-list order.
pub fn dials(n: usize, k: usize) -> Vec<Vec<u32>> {
    (0..n as u32).map(|u| (0..n as u32).filter(|&v| v != u).take(k).collect()).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn everyone_dials_the_head_of_the_list() {
        let dials = super::dials(5, 2);
        assert_eq!(dials, vec![vec![1, 2], vec![0, 2], vec![0, 1], vec![0, 1], vec![0, 1]]);
    }
}
