//! Proves libtorch is linked and computes: a broken link or a wrong library fails here.

use tch::{Kind, Tensor};

#[test]
fn matmul_and_softmax_match_known_values() {
    let a = Tensor::from_slice(&[1f32, 2., 3., 4.]).view([2, 2]);
    let b = Tensor::from_slice(&[5f32, 6., 7., 8.]).view([2, 2]);
    let c: Vec<f32> = a.matmul(&b).view([-1]).try_into().unwrap();
    assert_eq!(c, vec![19., 22., 43., 50.]);

    // softmax([0, ln 3]) = [0.25, 0.75]
    let s = Tensor::from_slice(&[0f64, 3f64.ln()]).softmax(0, Kind::Double);
    let s: Vec<f64> = s.try_into().unwrap();
    assert!((s[0] - 0.25).abs() < 1e-12 && (s[1] - 0.75).abs() < 1e-12);
}

#[test]
fn autograd_gives_analytic_gradient() {
    // d/dx sum(x^3) = 3 x^2
    let x = Tensor::from_slice(&[1f64, -2., 0.5]).set_requires_grad(true);
    x.pow_tensor_scalar(3).sum(Kind::Double).backward();
    let g: Vec<f64> = x.grad().try_into().unwrap();
    assert_eq!(g, vec![3.0, 12.0, 0.75]);
}
