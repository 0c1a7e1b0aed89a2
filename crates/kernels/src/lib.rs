//! The f32 CPU kernels of slime-rs behind a safe, slice-based API: strided matrix products
//! ([`matmul`], [`product`], [`product_cols`] on [`MatRef`] / [`MatMut`] views), row kernels
//! ([`vmath`]) and the AdamW update ([`adamw`]).
//!
//! Dispatch on the CPU happens here and nowhere else ([`cpu`]): products run AVX-512F register
//! tiles that read their operands in place when the CPU has AVX-512F, the `gemm` crate otherwise;
//! the row kernels and AdamW are compiled per instruction set (`#[target_feature]` builds picked
//! at run time). `SLIME_CPU=avx2`
//! or `baseline` caps the path (to measure what an AVX2 CPU runs on an AVX-512 one). For one CPU
//! path and thread count every result is deterministic; the row kernels and AdamW give the same
//! bits on every path, the products' last bits depend on tiles vs `gemm`.
//!
//! Every `unsafe` block in the crate sits in [`matmul`]'s core and the tile kernel (raw pointers
//! into views whose extents were checked when they were made), each with its reason.
//!
//! ```
//! use slime_kernels::{MatMut, MatRef, Threads, matmul, product};
//!
//! let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // 2 x 3
//! let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]; // 3 x 2
//! let ab = product(MatRef::row_major(&a, 2, 3), MatRef::row_major(&b, 3, 2), Threads::Pool);
//! assert_eq!(ab, [4.0, 5.0, 10.0, 11.0]);
//! // Add a^T times the identity (a^T itself) into the left 2 columns of a 3 x 3 buffer.
//! let mut c = [0.0; 9];
//! let at = MatRef::row_major(&a, 2, 3).t(); // 3 x 2
//! let e = [1.0, 0.0, 0.0, 1.0]; // 2 x 2 identity
//! matmul(MatMut::new(&mut c, 3, 2, 3), at, MatRef::row_major(&e, 2, 2), true, Threads::Single);
//! assert_eq!(c, [1.0, 4.0, 0.0, 2.0, 5.0, 0.0, 3.0, 6.0, 0.0]);
//! ```

pub mod adamw;
pub mod cpu;
mod mat;
mod matmul;
pub mod peak;
pub mod product_stats;
#[cfg(target_arch = "x86_64")]
mod tile;
pub mod vmath;

pub use cpu::CpuPath;
pub use mat::{MatMut, MatRef, Threads};
pub use matmul::{matmul, product, product_cols, products_on_this_thread};
