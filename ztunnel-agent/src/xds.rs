//! Sources of mesh configuration. For now the local file (upstream's LOCAL_XDS_PATH); the
//! delta ADS client will feed the same consumers.

pub mod local;
