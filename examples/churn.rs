//! Churn of one join and one leave over 40 fleets (mean and worst case), with and without zones:
//!
//!     cargo run --release --example churn -- 5000 3 4      (agents, zones, k)
use mesh_operator::planner::{self, Dials, Member, analysis};

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5000);
    let zones: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let k: u32 = std::env::args().nth(3).and_then(|a| a.parse().ok()).unwrap_or(4);
    let (mut jl, mut jd, mut ll, mut ld) = (vec![], vec![], vec![], vec![]);
    for t in 0..40u64 {
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                node_id: format!("{:016x}", (i as u64 + 1 + t * 100_000).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                domain: (zones > 1).then(|| format!("z{}", (i * 7 + t as usize) % zones)),
            })
            .collect();
        let seed = format!("s{t}");
        let p0 = planner::plan(&members, k, &seed, &Dials::new()).unwrap().dials();
        let again = planner::plan(&members, k, &seed, &p0).unwrap().dials();
        let c = analysis::churn(&p0, &again);
        assert_eq!(c.links_changed + c.dial_lists_changed, 0, "replanning a plan reproduces it");
        let mut joined = members.clone();
        joined.push(Member { node_id: format!("joiner{t}"), domain: (zones > 1).then(|| "z0".to_string()) });
        let p1 = planner::plan(&joined, k, &seed, &p0).unwrap().dials();
        let c = analysis::churn(&p0, &p1);
        jl.push(c.links_changed);
        jd.push(c.dial_lists_changed);
        let mut left = members.clone();
        left.remove((t as usize * 37) % n);
        let p2 = planner::plan(&left, k, &seed, &p0).unwrap().dials();
        let c = analysis::churn(&p0, &p2);
        ll.push(c.links_changed);
        ld.push(c.dial_lists_changed);
    }
    let s = |v: &Vec<usize>| {
        format!("mean {:.1} max {}", v.iter().sum::<usize>() as f64 / v.len() as f64, v.iter().max().unwrap())
    };
    println!("join links {} dials {} | leave links {} dials {}", s(&jl), s(&jd), s(&ll), s(&ld));
}
