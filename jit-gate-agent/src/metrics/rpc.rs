//! RPC latency per gRPC method: a tower layer around the API server, timing
//! each call from its request to its response head (for a stream: until it
//! starts). Method labels come from the served services' descriptors, so a
//! caller cannot create series with paths of its own ("unknown" instead).

use std::{
    collections::BTreeSet,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use prost::Message as _;
use tonic::codegen::http;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

/// The latency histograms, and the methods they may be labelled with.
#[derive(Clone)]
pub struct RpcMetrics {
    latency: Family<MethodLabel, Histogram>,
    known: Arc<BTreeSet<String>>,
}

impl RpcMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        // 50 µs to about 13 s.
        let latency = Family::<MethodLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
        });
        registry.register(
            "jit_gate_rpc_duration_seconds",
            "Time from an RPC's request to its response head, by method",
            latency.clone(),
        );
        RpcMetrics {
            latency,
            known: Arc::new(known_methods()),
        }
    }

    fn observe(&self, path: &str, started: Instant) {
        let method = if self.known.contains(path) {
            path.trim_start_matches('/').to_owned()
        } else {
            "unknown".to_owned()
        };
        self.latency
            .get_or_create(&MethodLabel { method })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// `/package.Service/Method` for every method the server serves.
fn known_methods() -> BTreeSet<String> {
    let mut known = BTreeSet::new();
    for set in [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    known.insert(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    known
}

/// The service the layer makes; without metrics it passes calls through
/// untimed.
#[derive(Clone)]
pub struct RpcLatency<S> {
    inner: S,
    metrics: Option<RpcMetrics>,
}

impl<S> RpcLatency<S> {
    pub fn new(inner: S, metrics: Option<RpcMetrics>) -> Self {
        RpcLatency { inner, metrics }
    }
}

impl<S, B> tower::Service<http::Request<B>> for RpcLatency<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let timing = self
            .metrics
            .clone()
            .map(|metrics| (metrics, request.uri().path().to_owned(), Instant::now()));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            if let Some((metrics, path, started)) = timing {
                metrics.observe(&path, started);
            }
            response
        })
    }
}
