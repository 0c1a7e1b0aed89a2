//! Strided matrix views over slices: [`MatRef`] (an operand, possibly transposed) and
//! [`MatMut`] (a row-major destination), and [`Threads`].
//!
//! A view checks at construction that every element it names lies in its slice, so the products
//! never read or write outside it; a `MatMut` borrows its slice mutably, so no operand can alias it.

/// A read-only `rows x cols` matrix in a slice. Stored row-major with row stride `stride`,
/// element `(r, c)` is `data[r * stride + c]`; a transposed view ([`Self::t`]) of a stored
/// `cols x rows` matrix reads `(r, c)` at `data[c * stride + r]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    stride: usize,
    transposed: bool,
}

/// Floats a row-major `rows x cols` matrix with row stride `stride` spans.
fn span(rows: usize, cols: usize, stride: usize) -> usize {
    if rows == 0 || cols == 0 { 0 } else { (rows - 1) * stride + cols }
}

/// Panics unless `len` floats hold the matrix (`what` names it).
fn check(len: usize, rows: usize, cols: usize, stride: usize, what: &str) -> usize {
    let need = span(rows, cols, stride);
    assert!(need <= len, "{what}: {rows} x {cols} at row stride {stride} needs {need} floats, the slice has {len}");
    need
}

impl<'a> MatRef<'a> {
    /// `rows x cols`, row-major in `data` with row stride `stride` (at least the span the matrix
    /// needs; longer slices are cut). Panics if `data` is too short.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, stride: usize) -> Self {
        let need = check(data.len(), rows, cols, stride, "matrix");
        Self { data: &data[..need], rows, cols, stride, transposed: false }
    }

    /// `rows x cols`, row-major and dense (row stride `cols`).
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols)
    }

    /// The transpose: `cols x rows`, the same storage.
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, transposed: !self.transposed, ..self }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Element `(r, c)`. Panics outside the matrix.
    pub fn get(&self, r: usize, c: usize) -> f32 {
        assert!(r < self.rows && c < self.cols, "({r}, {c}) outside {} x {}", self.rows, self.cols);
        let (rs, cs) = self.strides();
        self.data[r * rs + c * cs]
    }

    /// Row and column strides in floats.
    pub(crate) fn strides(&self) -> (usize, usize) {
        if self.transposed { (1, self.stride) } else { (self.stride, 1) }
    }

    /// The storage (exactly the span of the matrix).
    pub(crate) fn data(&self) -> &'a [f32] {
        self.data
    }
}

/// A writable, row-major `rows x cols` matrix in a slice: element `(r, c)` is
/// `data[r * stride + c]`, rows not overlapping (`stride >= cols`).
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    stride: usize,
}

impl<'a> MatMut<'a> {
    /// `rows x cols` in `data` with row stride `stride >= cols` (longer slices are cut). Panics
    /// if `data` is too short or rows would overlap.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, stride: usize) -> Self {
        assert!(rows <= 1 || stride >= cols, "destination rows overlap: {cols} columns at row stride {stride}");
        let need = check(data.len(), rows, cols, stride, "destination");
        Self { data: &mut data[..need], rows, cols, stride }
    }

    /// `rows x cols`, dense (row stride `cols`).
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols)
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row stride in floats.
    pub(crate) fn stride(&self) -> usize {
        self.stride
    }

    /// The storage (exactly the span of the matrix).
    pub(crate) fn data(&mut self) -> &mut [f32] {
        self.data
    }
}

/// How a product may use threads: the whole rayon pool, or the calling thread only (inside a
/// task that is itself one of many parallel tasks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// Split over rayon's pool (unless inside [`crate::products_on_this_thread`]).
    Pool,
    /// The calling thread only.
    Single,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_index_their_storage_and_transpose() {
        let v: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let m = MatRef::new(&v, 3, 2, 4);
        assert_eq!((m.rows(), m.cols(), m.get(2, 1)), (3, 2, 9.0));
        let t = m.t();
        assert_eq!((t.rows(), t.cols(), t.get(1, 2)), (2, 3, 9.0));
        assert_eq!(t.data().len(), 10);
        assert_eq!(MatRef::new(&v, 0, 5, 9).data().len(), 0);
    }

    #[test]
    #[should_panic(expected = "needs 13 floats")]
    fn a_view_past_its_slice_is_refused() {
        let v = [0f32; 12];
        let _ = MatRef::new(&v, 4, 1, 4);
    }

    #[test]
    #[should_panic(expected = "rows overlap")]
    fn overlapping_destination_rows_are_refused() {
        let mut v = [0f32; 12];
        let _ = MatMut::new(&mut v, 3, 4, 2);
    }
}
