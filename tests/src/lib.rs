//! gpugate end-to-end test support
