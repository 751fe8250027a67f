//! The floor of Tollgate's stack, for the load harness (`benches/load/run.sh`): a reverse proxy
//! on the same crates (tokio's default runtime, hyper's HTTP/1 server and client, TCP_NODELAY
//! on both sides) that does nothing else. Bodies pass through as they come; no parsing, no
//! routing, no ledger, no metrics. What Tollgate costs beyond this is the product's own work.
//!
//! ```text
//! bare_proxy --listen 127.0.0.1:0 --upstream 127.0.0.1:PORT
//! ```
//! Prints `listening on ADDR` on stdout once bound.

use std::net::SocketAddr;

use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut upstream: Option<Authority> = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = value.parse()?,
            "--upstream" => upstream = Some(value.parse()?),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let upstream = upstream.ok_or("--upstream HOST:PORT is required")?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new()).build(connector);

    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let (client, upstream) = (client.clone(), upstream.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| forward(client.clone(), upstream.clone(), request));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

async fn forward(
    client: Client<HttpConnector, Incoming>,
    upstream: Authority,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, http::Error> {
    let (mut head, body) = request.into_parts();
    let mut uri = head.uri.into_parts();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(upstream);
    head.uri = Uri::from_parts(uri)?;
    match client.request(Request::from_parts(head, body)).await {
        Ok(response) => Ok(response.map(BodyExt::boxed_unsync)),
        Err(_) => Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(Empty::new().map_err(|never| match never {}).boxed_unsync()),
    }
}
