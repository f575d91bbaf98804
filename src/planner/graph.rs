//! A simple undirected graph with bounded degree, each edge oriented to its dialer, stored flat
//! (`n × cap` slots) so a 10k-agent plan touches a few contiguous arrays and allocates nothing per agent.

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Graph {
    cap: usize,
    nbr: Vec<u32>,
    dials: Vec<bool>,
    deg: Vec<u8>,
}

impl Graph {
    pub fn new(n: usize, cap: usize) -> Self {
        assert!(cap <= u8::MAX as usize, "degree cap {cap} does not fit the slot counter");
        Self { cap, nbr: vec![0; n * cap], dials: vec![false; n * cap], deg: vec![0; n] }
    }

    pub fn len(&self) -> usize {
        self.deg.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deg.is_empty()
    }

    pub fn degree(&self, u: u32) -> usize {
        self.deg[u as usize] as usize
    }

    pub fn neighbors(&self, u: u32) -> &[u32] {
        let base = u as usize * self.cap;
        &self.nbr[base..base + self.degree(u)]
    }

    /// The peers `u` dials.
    pub fn dialed(&self, u: u32) -> impl Iterator<Item = u32> + '_ {
        self.oriented(u, true)
    }

    /// The peers that dial `u`.
    pub fn accepted(&self, u: u32) -> impl Iterator<Item = u32> + '_ {
        self.oriented(u, false)
    }

    /// The neighbours of `u` it dials (`dials`), or that dial it.
    fn oriented(&self, u: u32, dials: bool) -> impl Iterator<Item = u32> + '_ {
        let base = u as usize * self.cap;
        self.neighbors(u).iter().zip(&self.dials[base..]).filter(move |(_, d)| **d == dials).map(|(v, _)| *v)
    }

    pub fn out_degree(&self, u: u32) -> usize {
        self.dialed(u).count()
    }

    pub fn has_edge(&self, u: u32, v: u32) -> bool {
        let (a, b) = if self.degree(u) <= self.degree(v) { (u, v) } else { (v, u) };
        self.neighbors(a).contains(&b)
    }

    /// Whether `u` dials `v`; `None` when they are not adjacent.
    pub fn dialer_is(&self, u: u32, v: u32) -> Option<bool> {
        self.slot(u, v).map(|s| self.dials[s])
    }

    /// Adds the edge `u`–`v`, dialed by `u` when `u_dials`. The caller guarantees it is new and both ends
    /// have room: the cap is a structural invariant, so a violation is a planner bug worth a panic in tests.
    pub fn add_edge(&mut self, u: u32, v: u32, u_dials: bool) {
        debug_assert!(u != v && !self.has_edge(u, v), "edge {u}-{v} is a loop or already present");
        self.push(u, v, u_dials);
        self.push(v, u, !u_dials);
    }

    pub fn remove_edge(&mut self, u: u32, v: u32) {
        self.pull(u, v);
        self.pull(v, u);
    }

    /// Makes `u` the dialer of the existing edge `u`–`v`.
    pub fn set_dialer(&mut self, u: u32, v: u32) {
        if let (Some(su), Some(sv)) = (self.slot(u, v), self.slot(v, u)) {
            self.dials[su] = true;
            self.dials[sv] = false;
        }
    }

    /// Each edge once, as (dialer, peer).
    pub fn edges(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        (0..self.len() as u32).flat_map(move |u| self.dialed(u).map(move |v| (u, v)))
    }

    /// How many connected components the graph has.
    pub fn components(&self) -> usize {
        let mut seen = vec![false; self.len()];
        let mut stack = Vec::new();
        let mut count = 0;
        for s in 0..self.len() as u32 {
            if std::mem::replace(&mut seen[s as usize], true) {
                continue;
            }
            count += 1;
            stack.push(s);
            while let Some(u) = stack.pop() {
                for &v in self.neighbors(u) {
                    if !std::mem::replace(&mut seen[v as usize], true) {
                        stack.push(v);
                    }
                }
            }
        }
        count
    }

    pub fn edge_count(&self) -> usize {
        self.deg.iter().map(|d| *d as usize).sum::<usize>() / 2
    }

    fn slot(&self, u: u32, v: u32) -> Option<usize> {
        self.neighbors(u).iter().position(|w| *w == v).map(|i| u as usize * self.cap + i)
    }

    fn push(&mut self, u: u32, v: u32, dials: bool) {
        let d = self.degree(u);
        assert!(d < self.cap, "agent {u} would exceed the cap of {} links", self.cap);
        let s = u as usize * self.cap + d;
        self.nbr[s] = v;
        self.dials[s] = dials;
        self.deg[u as usize] += 1;
    }

    fn pull(&mut self, u: u32, v: u32) {
        let s = self.slot(u, v).expect("removing an edge that is not there");
        let last = u as usize * self.cap + self.degree(u) - 1;
        self.nbr[s] = self.nbr[last];
        self.dials[s] = self.dials[last];
        self.deg[u as usize] -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_remove_and_orientation() {
        let mut g = Graph::new(3, 2);
        g.add_edge(0, 1, true);
        g.add_edge(1, 2, false);
        assert_eq!(g.edge_count(), 2);
        assert_eq!(g.dialed(0).collect::<Vec<_>>(), vec![1]);
        assert_eq!(g.dialed(2).collect::<Vec<_>>(), vec![1]);
        g.set_dialer(1, 2);
        assert_eq!(g.dialer_is(1, 2), Some(true));
        assert_eq!(g.dialer_is(2, 1), Some(false));
        g.remove_edge(0, 1);
        assert!(!g.has_edge(1, 0));
        assert_eq!(g.edges().collect::<Vec<_>>(), vec![(1, 2)]);
    }

    #[test]
    #[should_panic(expected = "exceed the cap")]
    fn refuses_to_exceed_the_cap() {
        let mut g = Graph::new(3, 1);
        g.add_edge(0, 1, true);
        g.add_edge(0, 2, true);
    }
}
