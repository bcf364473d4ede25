//! DDPMWuerstchenScheduler (diffusers scheduling_ddpm_wuerstchen.py): a cosine schedule over
//! continuous t in [0, 1]. The per-step coefficients are scalars, computed on the host in
//! f32 in the order torch evaluates them; the tensor work is two affine ops and an add.

use candle_core::{DType, Result, Tensor};

use crate::config::SchedulerConfig;

/// The prior's timesteps in the Würstchen docs (`DEFAULT_STAGE_C_TIMESTEPS`):
/// `linspace(1, 2/3, 20) ++ linspace(2/3, 0, 11)[1:]`, 30 values, 29 steps.
pub fn default_prior_timesteps() -> Vec<f32> {
    let mut t = linspace(1.0, 2.0 / 3.0, 20);
    t.extend(linspace(2.0 / 3.0, 0.0, 11).into_iter().skip(1));
    t.into_iter().map(|v| v as f32).collect()
}

/// `linspace(1, 0, steps + 1)`: the schedule for a plain step count (torch computes it in
/// f32 as `start + i*step` for the first half and `end - (n-1-i)*step` for the second).
pub fn linear_timesteps(steps: usize) -> Vec<f32> {
    let n = steps + 1;
    if n == 1 {
        return vec![1.0];
    }
    let step = (0.0f32 - 1.0) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                1.0 + step * i as f32
            } else {
                0.0 - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// numpy's `linspace(start, stop, n)` in f64 (numpy: `start + i*step`, last value exact).
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    let step = (stop - start) / (n - 1) as f64;
    (0..n)
        .map(|i| if i == n - 1 { stop } else { start + i as f64 * step })
        .collect()
}

#[derive(Debug, Clone)]
pub struct DdpmWuerstchen {
    scaler: f32,
    s: f32,
    init_alpha_cumprod: f32,
}

/// The scalars of one step from `t` to `t_prev`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCoefficients {
    /// `sqrt(1 / alpha)`
    pub sample_scale: f32,
    /// `(1 - alpha) / sqrt(1 - alpha_cumprod)`, applied to the model output
    pub eps_scale: f32,
    /// the noise's standard deviation; 0 on the last step (`t_prev == 0`)
    pub noise_std: f32,
}

const PI: f32 = std::f32::consts::PI;

impl DdpmWuerstchen {
    pub fn new(cfg: &SchedulerConfig) -> Self {
        let s = cfg.s as f32;
        let c = (s / (1.0 + s) * PI * 0.5).cos();
        Self {
            scaler: cfg.scaler as f32,
            s,
            init_alpha_cumprod: c * c,
        }
    }

    /// `alpha_cumprod(t)`, clamped to [1e-4, 0.9999].
    pub fn alpha_cumprod(&self, t: f32) -> f32 {
        let t = if self.scaler > 1.0 {
            1.0 - (1.0 - t).powf(self.scaler)
        } else if self.scaler < 1.0 {
            t.powf(self.scaler)
        } else {
            t
        };
        let c = ((t + self.s) / (1.0 + self.s) * PI * 0.5).cos();
        (c * c / self.init_alpha_cumprod).clamp(1e-4, 0.9999)
    }

    pub fn coefficients(&self, t: f32, t_prev: f32) -> StepCoefficients {
        let acp = self.alpha_cumprod(t);
        let acp_prev = self.alpha_cumprod(t_prev);
        let alpha = acp / acp_prev;
        let noise_std = if t_prev != 0.0 {
            ((1.0 - alpha) * (1.0 - acp_prev) / (1.0 - acp)).sqrt()
        } else {
            0.0
        };
        StepCoefficients {
            sample_scale: (1.0 / alpha).sqrt(),
            eps_scale: (1.0 - alpha) / (1.0 - acp).sqrt(),
            noise_std,
        }
    }

    /// One step: `mu + std * noise` with `mu = sqrt(1/alpha) * (x - (1-alpha) eps / sqrt(1-acp))`.
    /// Computed in f32 (as diffusers does: its coefficients are f32 tensors that promote
    /// half-precision inputs) and returned in the sample's dtype. `noise` is ignored on the last
    /// step but must still have been drawn, to keep the random stream in step with diffusers.
    pub fn step(&self, model_output: &Tensor, t: f32, t_prev: f32, sample: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let k = self.coefficients(t, t_prev);
        let x = sample.to_dtype(DType::F32)?;
        let eps = model_output.to_dtype(DType::F32)?;
        let mu = ((x - (eps * k.eps_scale as f64)?)? * k.sample_scale as f64)?;
        let out = if k.noise_std != 0.0 {
            (mu + (noise.to_dtype(DType::F32)? * k.noise_std as f64)?)?
        } else {
            mu
        };
        out.to_dtype(sample.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_prior_timesteps_are_the_docs_schedule() {
        let t = default_prior_timesteps();
        assert_eq!(t.len(), 30);
        assert_eq!(t[0], 1.0);
        assert_eq!(t[19], (2.0f64 / 3.0) as f32);
        assert_eq!(t[29], 0.0);
        assert!(t.windows(2).all(|w| w[0] > w[1]));
        // numpy: linspace(1, 2/3, 20)[1] = 1 + (2/3 - 1)/19
        assert_eq!(t[1], (1.0 + (2.0f64 / 3.0 - 1.0) / 19.0) as f32);
    }

    #[test]
    #[allow(clippy::excessive_precision)] // torch's values as Python prints them
    fn linear_timesteps_match_torch_linspace() {
        // torch.linspace(1.0, 0.0, 13) (float32), printed with repr(float)
        let want: [f32; 13] = [
            1.0,
            0.9166666865348816,
            0.8333333134651184,
            0.75,
            0.6666666269302368,
            0.5833333134651184,
            0.5,
            0.4166666865348816,
            0.3333333432674408,
            0.25,
            0.1666666716337204,
            0.0833333358168602,
            0.0,
        ];
        assert_eq!(linear_timesteps(12), want);
    }

    #[test]
    fn last_step_adds_no_noise() {
        let s = DdpmWuerstchen::new(&SchedulerConfig::default());
        assert_eq!(s.coefficients(0.1, 0.0).noise_std, 0.0);
        assert!(s.coefficients(0.5, 0.4).noise_std > 0.0);
        assert_eq!(s.alpha_cumprod(0.0), 0.9999);
        assert_eq!(s.alpha_cumprod(1.0), 1e-4);
    }
}
