//! With the `cuda` feature, compiles `kernels/*.cu` into PTX (with cudaforge, the builder
//! candle-kernels uses; target from `CUDA_COMPUTE_CAP`, else the local GPU) and writes
//! `$OUT_DIR/ptx.rs` with one `&str` constant per file, which `src/ops/kernels.rs` includes.
//! Without the feature it does nothing.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda_kernels();
}

#[cfg(feature = "cuda")]
fn cuda_kernels() {
    println!("cargo::rerun-if-changed=kernels");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = cudaforge::KernelBuilder::new()
        .source_dir("kernels")
        .arg("-std=c++17")
        .arg("-O3")
        .build_ptx()
        .unwrap_or_else(|e| {
            panic!(
                "compiling kernels/*.cu to PTX failed: {e}\n(the cuda feature needs nvcc on PATH \
                 and CUDA_COMPUTE_CAP or a GPU: see docs/cuda.md, Building)"
            )
        });
    ptx.write(out.join("ptx.rs"))
        .unwrap_or_else(|e| panic!("writing {}: {e}", out.join("ptx.rs").display()));
}
