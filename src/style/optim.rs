//! Optimisers over the image, in the ask/tell form the stylizer's loop needs: given the gradient at
//! the current point, each proposes the step to add. L-BFGS follows the reference tools (torch's
//! `optim.LBFGS` without line search: two-loop recursion, history ~100, first step scaled by
//! 1/‖g‖₁); Adam is the usual bias-corrected one. Curvature pairs are accepted by a scale-free test,
//! so the loss needs no particular magnitude.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Which optimiser, as the user asks for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Limited-memory BFGS, the reference tools' choice.
    #[default]
    Lbfgs,
    /// Adam with a fixed learning rate.
    Adam,
}

impl std::str::FromStr for OptimizerKind {
    type Err = crate::Error;
    fn from_str(text: &str) -> crate::Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "lbfgs" | "l-bfgs" => Ok(OptimizerKind::Lbfgs),
            "adam" => Ok(OptimizerKind::Adam),
            _ => Err(crate::Error::Settings(format!("optimizer '{text}': expected 'lbfgs' or 'adam'"))),
        }
    }
}

/// Proposes steps from gradients.
pub trait Optimizer {
    /// The step to add to the current point, given the gradient there; `None` when the method
    /// cannot find a descent direction (converged).
    fn propose(&mut self, grad: &Tensor) -> Option<Tensor>;

    /// Forgets the accumulated state (after a step that had to be undone).
    fn reset(&mut self);
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    device_dot(a, b).double_value(&[])
}

/// aᵀb as a 0-d tensor on the tensors' device: no wait for the device to finish.
fn device_dot(a: &Tensor, b: &Tensor) -> Tensor {
    (a * b).sum(Kind::Double)
}

/// L-BFGS without line search (as torch.optim.LBFGS with `line_search_fn=None`).
pub struct Lbfgs {
    history: usize,
    learning_rate: f64,
    /// (s, y, 1/(yᵀs)) pairs, oldest first.
    pairs: std::collections::VecDeque<(Tensor, Tensor, f64)>,
    previous: Option<(Tensor, Tensor)>, // (gradient, step) at the last proposal
    hessian_diagonal: f64,
}

impl Lbfgs {
    /// An L-BFGS keeping `history` curvature pairs, with step scale `learning_rate` (1 in the references).
    pub fn new(history: usize, learning_rate: f64) -> Self {
        Lbfgs {
            history: history.max(1),
            learning_rate,
            pairs: Default::default(),
            previous: None,
            hessian_diagonal: 1.0,
        }
    }

    fn remember(&mut self, grad: &Tensor) {
        let Some((old_grad, old_step)) = self.previous.take() else { return };
        let y = grad - old_grad;
        // one read from the device for the three products
        let products =
            Tensor::stack(&[device_dot(&y, &old_step), device_dot(&y, &y), device_dot(&old_step, &old_step)], 0);
        let products = Vec::<f64>::try_from(products.to_device(tch::Device::Cpu)).unwrap_or_default();
        let [ys, yy, ss] = products[..] else { return };
        // scale-free curvature test: yᵀs must be positive relative to ‖y‖‖s‖
        if ys > 1e-10 * (yy * ss).sqrt() && yy > 0.0 {
            if self.pairs.len() == self.history {
                self.pairs.pop_front();
            }
            self.hessian_diagonal = ys / yy;
            self.pairs.push_back((old_step, y, 1.0 / ys));
        }
    }

    /// The two-loop recursion, entirely on the device: the coefficients stay 0-d tensors, so a GPU
    /// runs the whole recursion without waiting for the host (history 100 would otherwise mean 200
    /// round trips per iteration).
    fn direction(&self, grad: &Tensor) -> Tensor {
        let mut q = -grad;
        let mut alphas = Vec::with_capacity(self.pairs.len());
        for (s, y, rho) in self.pairs.iter().rev() {
            let alpha = (device_dot(s, &q) * *rho).to_kind(Kind::Float);
            q -= y * &alpha;
            alphas.push(alpha);
        }
        let mut r = q * self.hessian_diagonal;
        for ((s, y, rho), alpha) in self.pairs.iter().zip(alphas.into_iter().rev()) {
            let beta = (device_dot(y, &r) * *rho).to_kind(Kind::Float);
            r += s * (alpha - beta);
        }
        r
    }
}

impl Optimizer for Lbfgs {
    fn reset(&mut self) {
        self.pairs.clear();
        self.previous = None;
        self.hessian_diagonal = 1.0;
    }

    fn propose(&mut self, grad: &Tensor) -> Option<Tensor> {
        let grad = grad.detach();
        let first = self.previous.is_none() && self.pairs.is_empty();
        self.remember(&grad);
        let direction = self.direction(&grad);
        let slope = dot(&grad, &direction);
        if !(slope < 0.0) {
            return None;
        }
        let scale = if first {
            let l1 = grad.abs().sum(Kind::Double).double_value(&[]);
            (1.0f64).min(1.0 / l1.max(f64::MIN_POSITIVE)) * self.learning_rate
        } else {
            self.learning_rate
        };
        let step = direction * scale;
        self.previous = Some((grad, step.shallow_clone()));
        Some(step)
    }
}

/// Adam (Kingma & Ba) with bias correction.
pub struct Adam {
    learning_rate: f64,
    beta1: f64,
    beta2: f64,
    epsilon: f64,
    moments: Option<(Tensor, Tensor)>,
    steps: i32,
}

impl Adam {
    /// Adam with the usual β₁ = 0.9, β₂ = 0.999, ε = 1e-8.
    pub fn new(learning_rate: f64) -> Self {
        Adam { learning_rate, beta1: 0.9, beta2: 0.999, epsilon: 1e-8, moments: None, steps: 0 }
    }
}

impl Optimizer for Adam {
    fn reset(&mut self) {
        self.moments = None;
        self.steps = 0;
        self.learning_rate *= 0.5;
    }

    fn propose(&mut self, grad: &Tensor) -> Option<Tensor> {
        let grad = grad.detach();
        self.steps += 1;
        let (m, v) = match self.moments.take() {
            None => (&grad * (1.0 - self.beta1), grad.square() * (1.0 - self.beta2)),
            Some((m, v)) => {
                (m * self.beta1 + &grad * (1.0 - self.beta1), v * self.beta2 + grad.square() * (1.0 - self.beta2))
            }
        };
        let m_hat = &m / (1.0 - self.beta1.powi(self.steps));
        let v_hat = &v / (1.0 - self.beta2.powi(self.steps));
        let step = -(m_hat / (v_hat.sqrt() + self.epsilon)) * self.learning_rate;
        self.moments = Some((m, v));
        Some(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Runs `iterations` proposals on `objective` from `start`; returns the final point.
    fn minimise(
        optimizer: &mut dyn Optimizer,
        start: &Tensor,
        iterations: usize,
        objective: impl Fn(&Tensor) -> Tensor,
    ) -> Tensor {
        let mut x = start.copy();
        for _ in 0..iterations {
            let point = x.detach().set_requires_grad(true);
            objective(&point).backward();
            match optimizer.propose(&point.grad()) {
                Some(step) => x = x.detach() + step,
                None => break,
            }
        }
        x
    }

    fn rosenbrock(p: &Tensor) -> Tensor {
        let x = p.get(0);
        let y = p.get(1);
        (-&x + 1.0).square() + (y - x.square()).square() * 100.0
    }

    #[test]
    fn lbfgs_solves_a_quadratic_in_few_steps() {
        let scales = Tensor::from_slice(&[1.0f64, 10.0, 100.0, 0.5]);
        let target = Tensor::from_slice(&[1.0f64, -2.0, 3.0, 0.25]);
        let objective = |x: &Tensor| ((x - &target).square() * &scales).sum(Kind::Double);
        let start = Tensor::zeros([4], (Kind::Double, Device::Cpu));
        let x = minimise(&mut Lbfgs::new(10, 1.0), &start, 30, objective);
        assert!(x.allclose(&target, 1e-6, 1e-6, false), "{x:?}");
    }

    #[test]
    fn lbfgs_solves_rosenbrock() {
        let start = Tensor::from_slice(&[-1.2f64, 1.0]);
        let x = minimise(&mut Lbfgs::new(100, 1.0), &start, 400, rosenbrock);
        let expected = Tensor::from_slice(&[1.0f64, 1.0]);
        assert!(x.allclose(&expected, 1e-3, 1e-3, false), "{:?}", Vec::<f64>::try_from(&x).unwrap());
    }

    #[test]
    fn lbfgs_is_indifferent_to_the_loss_scale() {
        let target = Tensor::from_slice(&[0.3f64, -0.7]);
        let tiny = |x: &Tensor| (x - &target).square().sum(Kind::Double) * 1e-12;
        let start = Tensor::zeros([2], (Kind::Double, Device::Cpu));
        let x = minimise(&mut Lbfgs::new(10, 1.0), &start, 60, tiny);
        assert!(x.allclose(&target, 1e-4, 1e-4, false), "{:?}", Vec::<f64>::try_from(&x).unwrap());
    }

    #[test]
    fn adam_descends_rosenbrock() {
        let start = Tensor::from_slice(&[-1.2f64, 1.0]);
        let before = rosenbrock(&start).double_value(&[]);
        let x = minimise(&mut Adam::new(0.02), &start, 3000, rosenbrock);
        let after = rosenbrock(&x).double_value(&[]);
        assert!(after < before * 1e-3, "{before} → {after}");
    }
}
