// Rust with iterator chains, generics and closures, optimized (test input).
use std::collections::HashMap;

#[inline(never)]
fn histogram<T: std::hash::Hash + Eq + Clone>(items: &[T]) -> HashMap<T, usize> {
    let mut h = HashMap::new();
    for i in items {
        *h.entry(i.clone()).or_insert(0) += 1;
    }
    h
}

fn main() {
    let n = std::env::args().count() * 1000;
    let words: Vec<String> = (0..n).map(|i| format!("w{}", i % 37)).collect();
    let h = histogram(&words);
    let total: usize = h.values().filter(|&&c| c > 1).map(|c| c * 2).sum();
    let mut v: Vec<_> = h.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    println!("{total} {:?}", v.first());
}
