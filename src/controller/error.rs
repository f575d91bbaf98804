//! Why a reconcile failed, by step. Each error keeps its source, and [`Error::kind`] is the label of the
//! `mesh_operator_reconcile_errors_total{kind}` metric. A reconcile that found a problem it reports in
//! status (an invalid spec, an unreachable rendezvous, a failed Pod write) has not failed: it is requeued
//! on its own schedule. These are the failures of the reconcile itself.
use kube::runtime::finalizer;

use super::apply::WriteError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Adding or removing our finalizer failed.
    #[error("updating the finalizer: {0}")]
    Finalizer(#[source] kube::Error),
    /// The object cannot carry a finalizer (no name, or an invalid finalizer name).
    #[error("the finalizer cannot be managed: {0}")]
    Unmanageable(String),
    /// Writing the MeshPolicy's status failed.
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
    /// Deleting the policy: its Pods do not all carry nothing of it yet.
    #[error("releasing the Pods: {0}")]
    Cleanup(#[from] CleanupError),
}

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("the Pod cache does not show our latest writes yet")]
    CacheBehind,
    #[error("{failed} Pod writes failed; first: Pod {pod}: {source}")]
    Write {
        failed: usize,
        pod: String,
        #[source]
        source: WriteError,
    },
    #[error("leadership lost before every Pod was released")]
    LostLeadership,
}

impl Error {
    /// Every [`Error::kind`].
    pub const KINDS: [&str; 4] = ["finalizer", "unmanageable", "status", "cleanup"];

    /// A stable label for the reconcile error metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Finalizer(_) => "finalizer",
            Self::Unmanageable(_) => "unmanageable",
            Self::Status(_) => "status",
            Self::Cleanup(_) => "cleanup",
        }
    }
}

/// The finalizer helper's error, unwrapped: the reconcile's own error stays what it was.
impl From<finalizer::Error<Error>> for Error {
    fn from(e: finalizer::Error<Error>) -> Self {
        match e {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e) => Self::Finalizer(e),
            other @ (finalizer::Error::UnnamedObject | finalizer::Error::InvalidFinalizer) => {
                Self::Unmanageable(other.to_string())
            }
        }
    }
}

/// Whether the finalizer helper's patch was refused as invalid (422). Its JSON patch tests the finalizers
/// it read, so a policy changed since the cache read it (most often by our own add, not seen yet) gets
/// this answer; so does one the API server refuses for good. [`super::reconcile`] tells them apart.
pub fn finalizer_patch_refused(e: &finalizer::Error<Error>) -> bool {
    match e {
        finalizer::Error::AddFinalizer(kube::Error::Api(s))
        | finalizer::Error::RemoveFinalizer(kube::Error::Api(s)) => s.code == 422,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(kube::core::Status::failure("boom", "Conflict").with_code(code).boxed())
    }

    #[test]
    fn each_failure_is_counted_under_its_own_step() {
        let cases: [(finalizer::Error<Error>, &str); 6] = [
            (finalizer::Error::ApplyFailed(Error::Status(api_error(409))), "status"),
            (finalizer::Error::CleanupFailed(CleanupError::CacheBehind.into()), "cleanup"),
            (finalizer::Error::AddFinalizer(api_error(403)), "finalizer"),
            (finalizer::Error::RemoveFinalizer(api_error(500)), "finalizer"),
            (finalizer::Error::UnnamedObject, "unmanageable"),
            (finalizer::Error::InvalidFinalizer, "unmanageable"),
        ];
        for (e, kind) in cases {
            let shown = e.to_string();
            let e = Error::from(e);
            assert_eq!(e.kind(), kind, "{shown}");
            assert!(Error::KINDS.contains(&e.kind()));
        }
    }

    #[test]
    fn only_a_refused_finalizer_patch_may_be_a_stale_read() {
        let cases: [(finalizer::Error<Error>, bool); 5] = [
            (finalizer::Error::AddFinalizer(api_error(422)), true),
            (finalizer::Error::RemoveFinalizer(api_error(422)), true),
            (finalizer::Error::AddFinalizer(api_error(403)), false),
            (finalizer::Error::ApplyFailed(Error::Status(api_error(422))), false),
            (finalizer::Error::UnnamedObject, false),
        ];
        for (e, stale) in cases {
            assert_eq!(finalizer_patch_refused(&e), stale, "{e}");
        }
    }

    #[test]
    fn a_failed_write_keeps_its_source() {
        let e = Error::from(CleanupError::Write { failed: 2, pod: "a".into(), source: api_error(422).into() });
        let cleanup = std::error::Error::source(&e).expect("the cleanup error");
        let write = cleanup.source().expect("the write error");
        assert!(write.to_string().contains("boom"), "{write}");
        assert!(e.to_string().starts_with("releasing the Pods: 2 Pod writes failed; first: Pod a: "), "{e}");
    }
}
