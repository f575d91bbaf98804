//! A full plan (no previous plan) for N ∈ {1k, 10k, 20k} × k ∈ {4, 8, 16}, the same over three zones at
//! N = 10k, and a replan after one join: from scratch, and with the last plan's memo (what the
//! controller's kept plan does).
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mesh_operator::planner::{self, Dials, Indexed, Member};

fn members(n: usize, zones: usize) -> Vec<Member> {
    (0..n)
        .map(|i| Member {
            node_id: format!("{:064x}", (i as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            domain: (zones > 0).then(|| format!("zone-{}", i % zones)),
        })
        .collect()
}

fn full_plan(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan");
    for n in [1_000, 10_000, 20_000] {
        let m = members(n, 0);
        for k in [4u32, 8, 16] {
            group.throughput(Throughput::Elements((n * k as usize) as u64));
            group.bench_with_input(BenchmarkId::new(format!("k{k}"), n), &m, |b, m| {
                b.iter(|| planner::plan(m, k, "bench", &Dials::new()).unwrap())
            });
        }
    }
    group.finish();
}

/// The same with `topologyKey` over three zones: the domain-sorted backbone and the spreading switches.
fn full_plan_three_zones(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan_3_zones");
    let m = members(10_000, 3);
    for k in [3u32, 4, 8] {
        group.bench_with_input(BenchmarkId::new(format!("k{k}"), 10_000), &m, |b, m| {
            b.iter(|| planner::plan(m, k, "bench", &Dials::new()).unwrap())
        });
    }
    group.finish();
}

fn replan_after_join(c: &mut Criterion) {
    let m = members(10_000, 0);
    let previous = planner::plan(&m, 8, "bench", &Dials::new()).unwrap().dials();
    let mut joined = m.clone();
    joined.push(Member { node_id: "f".repeat(64), domain: None });
    c.bench_function("replan_join/k8/10000", |b| b.iter(|| planner::plan(&joined, 8, "bench", &previous).unwrap()));
    for k in [4u32, 8] {
        let mut memo = planner::Memo::default();
        planner::graph_kept(&m, k, "bench", Indexed::default(), vec![], (&mut memo, &[])).unwrap();
        let was: Vec<Option<u32>> = (0..m.len() as u32).map(Some).chain([None]).collect();
        c.bench_function(&format!("graph_join/k{k}/10000"), |b| {
            b.iter(|| planner::graph(&joined, k, "bench", Indexed::default(), vec![]).unwrap())
        });
        c.bench_function(&format!("graph_join_memo/k{k}/10000"), |b| {
            b.iter_batched_ref(
                || memo.clone(),
                |memo| planner::graph_kept(&joined, k, "bench", Indexed::default(), vec![], (memo, &was)).unwrap(),
                BatchSize::LargeInput,
            )
        });
    }
}

criterion_group!(benches, full_plan, full_plan_three_zones, replan_after_join);
criterion_main!(benches);
