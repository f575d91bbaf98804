//! What opening one link costs: TCP connect, the mutual TLS 1.3 handshake with both node keys, the
//! WebSocket upgrade and the welcome, dialer and acceptor together on one thread. On one core this time is
//! the CPU a link costs both its ends (`cargo bench --bench link_handshake`).
use std::sync::Arc;

use agent_mesh::handshake::{self, Hello};
use agent_mesh::identity::Identity;
use agent_mesh::tls::Credentials;
use agent_mesh::transport;
use criterion::{Criterion, criterion_group, criterion_main};

fn link(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let acceptor = Identity::generate();
    let id = acceptor.node_id();
    let (server, client) = (Arc::new(Credentials::new(&acceptor)), Credentials::new(&Identity::generate()));
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("wss://{}/crdt-sync", listener.local_addr().unwrap());
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let server = server.clone();
            tokio::spawn(async move {
                if let Ok(mut inbound) = transport::accept(tcp, &server).await {
                    let _ = handshake::welcome(&mut inbound.wire).await;
                }
            });
        }
    });
    c.bench_function("link/open (TCP + TLS 1.3 + upgrade + welcome, both ends)", |b| {
        b.iter(|| rt.block_on(transport::dial(&url, &client, &id, Hello::default(), None)).expect("a link"))
    });
}

criterion_group!(benches, link);
criterion_main!(benches);
