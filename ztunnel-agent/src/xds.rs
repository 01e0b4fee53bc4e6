//! Sources of mesh configuration: the local file (upstream's LOCAL_XDS_PATH) and the delta
//! ADS client for istiod; both produce the same mesh state.

pub mod client;
pub mod convert;
pub mod local;
