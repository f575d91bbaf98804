//! Measurements of a mesh given as dial lists (member index → indices it dials), so the planner and the
//! baseline are measured by the same code. A link is one dialed connection: if A dials B and B dials A,
//! that is two links, as it is two sockets.
use std::collections::{BTreeSet, VecDeque};

use super::Dials;

/// Undirected adjacency (both directions of every dial; a mutual pair appears twice).
pub fn adjacency(dials: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let mut adj: Vec<Vec<u32>> = dials.to_vec();
    for (u, ds) in dials.iter().enumerate() {
        for &v in ds {
            adj[v as usize].push(u as u32);
        }
    }
    adj
}

/// Links (dialed plus accepted) per member.
pub fn links(adj: &[Vec<u32>]) -> Vec<usize> {
    adj.iter().map(Vec::len).collect()
}

/// Sizes of the connected components among members not `removed`, largest first.
pub fn component_sizes(adj: &[Vec<u32>], removed: &[bool]) -> Vec<usize> {
    let mut seen = removed.to_vec();
    let mut sizes = Vec::new();
    let mut queue = VecDeque::new();
    for s in 0..adj.len() {
        if seen[s] {
            continue;
        }
        seen[s] = true;
        queue.push_back(s as u32);
        let mut size = 0;
        while let Some(u) = queue.pop_front() {
            size += 1;
            for &v in &adj[u as usize] {
                if !seen[v as usize] {
                    seen[v as usize] = true;
                    queue.push_back(v);
                }
            }
        }
        sizes.push(size);
    }
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    sizes
}

/// Share of surviving members that sit in the largest component (1.0 when nobody survives).
pub fn largest_component_share(adj: &[Vec<u32>], removed: &[bool]) -> f64 {
    let survivors = removed.iter().filter(|r| !**r).count();
    if survivors == 0 {
        return 1.0;
    }
    component_sizes(adj, removed).first().copied().unwrap_or(0) as f64 / survivors as f64
}

/// Betweenness centrality of each member (Brandes 2001): how many shortest paths between others pass
/// through it. The members an attacker, or bad luck, would take out first.
pub fn betweenness(adj: &[Vec<u32>]) -> Vec<f64> {
    let n = adj.len();
    let mut score = vec![0.0; n];
    for s in 0..n {
        let (mut sigma, mut dist, mut preds) = (vec![0.0; n], vec![u32::MAX; n], vec![Vec::new(); n]);
        let (mut order, mut queue) = (Vec::with_capacity(n), VecDeque::from([s]));
        (sigma[s], dist[s]) = (1.0, 0);
        while let Some(v) = queue.pop_front() {
            order.push(v);
            for &w in &adj[v] {
                let w = w as usize;
                if dist[w] == u32::MAX {
                    dist[w] = dist[v] + 1;
                    queue.push_back(w);
                }
                if dist[w] == dist[v] + 1 {
                    sigma[w] += sigma[v];
                    preds[w].push(v);
                }
            }
        }
        let mut delta = vec![0.0; n];
        for &w in order.iter().rev() {
            for &v in &preds[w] {
                delta[v] += sigma[v] / sigma[w] * (1.0 + delta[w]);
            }
            if w != s {
                score[w] += delta[w];
            }
        }
    }
    score
}

fn eccentricity(adj: &[Vec<u32>], s: usize, dist: &mut [u32]) -> (u32, usize) {
    dist.fill(u32::MAX);
    dist[s] = 0;
    let mut queue = VecDeque::from([s as u32]);
    let (mut far, mut far_node) = (0, s);
    while let Some(u) = queue.pop_front() {
        for &v in &adj[u as usize] {
            if dist[v as usize] == u32::MAX {
                dist[v as usize] = dist[u as usize] + 1;
                if dist[v as usize] > far {
                    (far, far_node) = (dist[v as usize], v as usize);
                }
                queue.push_back(v);
            }
        }
    }
    (far, far_node)
}

/// The diameter of the largest component: exact (a BFS from every member) up to `exact_limit` members,
/// otherwise the largest eccentricity found by double sweeps from `samples` spread starting points,
/// which is a lower bound. Returns (diameter, exact).
pub fn diameter(adj: &[Vec<u32>], exact_limit: usize, samples: usize) -> (u32, bool) {
    let n = adj.len();
    if n == 0 {
        return (0, true);
    }
    let mut dist = vec![u32::MAX; n];
    // Start inside the largest component so the sweeps measure it, not a stray fragment.
    let start = largest_component_member(adj);
    let exact = n <= exact_limit;
    let sources: Vec<usize> =
        if exact { (0..n).collect() } else { (0..samples).map(|i| (start + i * n / samples.max(1)) % n).collect() };
    let mut best = 0;
    for s in sources {
        let (e, far) = eccentricity(adj, s, &mut dist);
        best = best.max(e);
        if !exact {
            best = best.max(eccentricity(adj, far, &mut dist).0);
        }
    }
    (best, exact)
}

fn largest_component_member(adj: &[Vec<u32>]) -> usize {
    let mut label = vec![usize::MAX; adj.len()];
    let (mut best, mut best_size) = (0, 0);
    for s in 0..adj.len() {
        if label[s] != usize::MAX {
            continue;
        }
        label[s] = s;
        let mut queue = VecDeque::from([s]);
        let mut size = 0;
        while let Some(u) = queue.pop_front() {
            size += 1;
            for &v in &adj[u] {
                if label[v as usize] == usize::MAX {
                    label[v as usize] = s;
                    queue.push_back(v as usize);
                }
            }
        }
        if size > best_size {
            (best, best_size) = (s, size);
        }
    }
    best
}

/// What a replan changed: links added or removed, and members present in both whose dial list changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Churn {
    pub links_changed: usize,
    pub dial_lists_changed: usize,
}

pub fn churn(before: &Dials, after: &Dials) -> Churn {
    // Undirected: a link whose dialer flipped is the same link (it shows in the dial lists instead).
    let link_set = |a: &Dials| -> BTreeSet<(String, String)> {
        a.iter()
            .flat_map(|(u, vs)| {
                vs.iter().map(move |v| if u < v { (u.clone(), v.clone()) } else { (v.clone(), u.clone()) })
            })
            .collect()
    };
    let (b, a) = (link_set(before), link_set(after));
    let dial_lists_changed = before.iter().filter(|(id, dials)| after.get(*id).is_some_and(|d| d != *dials)).count();
    Churn { links_changed: b.symmetric_difference(&a).count(), dial_lists_changed }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_path_with_a_mutual_pair() {
        // 0→1, 1→0, 1→2: three links; member 1 holds all three.
        let adj = adjacency(&[vec![1], vec![0, 2], vec![]]);
        assert_eq!(links(&adj), vec![2, 3, 1]);
        assert_eq!(component_sizes(&adj, &[false; 3]), vec![3]);
        assert_eq!(component_sizes(&adj, &[false, true, false]), vec![1, 1]);
        assert_eq!(largest_component_share(&adj, &[false, true, false]), 0.5);
        assert_eq!(diameter(&adj, 10, 0), (2, true));
        // Between 0 and 2, every shortest path passes 1; none passes an end.
        assert_eq!(betweenness(&adjacency(&[vec![1], vec![2], vec![]])), vec![0.0, 2.0, 0.0]);
    }

    #[test]
    fn churn_counts_links_and_dial_lists() {
        let before: Dials = [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec![])]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
            .collect();
        let mut after = before.clone();
        after.insert("b".into(), vec!["d".into()]);
        after.insert("d".into(), vec![]);
        assert_eq!(churn(&before, &after), Churn { links_changed: 2, dial_lists_changed: 1 });
        // A flipped dialer is no link change, but two dial lists change.
        let mut flipped = before.clone();
        flipped.insert("a".into(), vec![]);
        flipped.insert("b".into(), vec!["a".into(), "c".into()]);
        assert_eq!(churn(&before, &flipped), Churn { links_changed: 0, dial_lists_changed: 2 });
    }
}
