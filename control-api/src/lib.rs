//! gpugate-api
