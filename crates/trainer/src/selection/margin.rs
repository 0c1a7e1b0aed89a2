//! Each preference objective's own margin and target, as SAGE scores pairs with them.
//!
//! With `S` a completion's summed log-prob, `n` its token count, `A = S / n` its mean, `R` the
//! reference's sum and `Delta = (S_w - R_w) - (S_l - R_l)`:
//!
//! | objective | margin `m` (what its loss pushes up) | target (where its push ends or halves) |
//! |---|---|---|
//! | SLIME | `D = A_w - A_l` | `m_h` (the margin term is 0 for `D >= m_h`); `m_s` with the hard margin off |
//! | SimPO | `beta (A_w - A_l)` | `gamma = beta * gamma_beta_ratio` |
//! | CPO | `beta (S_w - S_l)` | 0 (the logistic loss's midpoint) |
//! | CPO-SimPO | `beta (A_w - A_l)` | `simpo_gamma` |
//! | ORPO | log odds ratio `(A_w - A_l) - (log(1 - e^A_w) - log(1 - e^A_l))` | 0 |
//! | DPO sigmoid / robust | `beta Delta` | 0 (the logistic loss's midpoint: gradient weight 1/2) |
//! | DPO hinge | `beta Delta` | 1 (the hinge is 0 for `beta Delta >= 1`) |
//! | IPO | `Delta_w / n_w - Delta_l / n_l` | `1 / (2 beta)` (the squared loss's minimum) |
//!
//! SFT has no margin; SAGE selection with it is an error.

use slime_data::PairLogps;
use slime_objectives::numerics::log1mexp;
use slime_objectives::{CpoVariant, DpoLossType, Objective};

use crate::{Result, TrainError};

/// The target margin of `objective` (see the module table).
pub fn objective_target(objective: &Objective) -> Result<f64> {
    Ok(match objective {
        Objective::Slime(p) => {
            if p.use_hard_margin {
                p.m_h
            } else {
                p.m_s
            }
        }
        Objective::Simpo(p) => p.gamma(),
        Objective::Cpo(p) => match p.variant {
            CpoVariant::Cpo => 0.0,
            CpoVariant::CpoSimpo => p.simpo_gamma,
        },
        Objective::Orpo(_) => 0.0,
        Objective::Dpo(p) => match p.loss {
            DpoLossType::Sigmoid | DpoLossType::Robust => 0.0,
            DpoLossType::Hinge => 1.0,
        },
        Objective::Ipo(p) => 1.0 / (2.0 * p.beta),
        Objective::Sft(_) => return Err(no_margin()),
    })
}

/// The margin of one pair under `objective` (see the module table): `sums` are the policy's
/// summed log-probs and token counts, `reference` the reference's `(R_w, R_l)`, required by
/// DPO and IPO.
pub fn objective_margin(objective: &Objective, sums: &PairLogps, reference: Option<(f64, f64)>) -> Result<f64> {
    let (s_w, s_l) = (sums.chosen_logp, sums.rejected_logp);
    let (n_w, n_l) = (f64::from(sums.chosen_tokens.max(1)), f64::from(sums.rejected_tokens.max(1)));
    let (a_w, a_l) = (s_w / n_w, s_l / n_l);
    let with_reference = |name: &str| {
        reference.ok_or_else(|| {
            TrainError::Config(format!("SAGE: objective {name} needs reference log-probs for pair {}", sums.pair))
        })
    };
    Ok(match objective {
        Objective::Slime(_) => a_w - a_l,
        Objective::Simpo(p) => p.beta * (a_w - a_l),
        Objective::Cpo(p) => match p.variant {
            CpoVariant::Cpo => p.beta * (s_w - s_l),
            CpoVariant::CpoSimpo => p.beta * (a_w - a_l),
        },
        Objective::Orpo(_) => (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l)),
        Objective::Dpo(p) => {
            let (r_w, r_l) = with_reference("dpo")?;
            p.beta * ((s_w - r_w) - (s_l - r_l))
        }
        Objective::Ipo(_) => {
            let (r_w, r_l) = with_reference("ipo")?;
            (s_w - r_w) / n_w - (s_l - r_l) / n_l
        }
        Objective::Sft(_) => return Err(no_margin()),
    })
}

fn no_margin() -> TrainError {
    TrainError::Config(
        "preference.selection = \"sage\" needs a preference objective: sft has no margin to score pairs by".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use slime_objectives::{CpoParams, DpoParams, IpoParams, OrpoParams, SftParams, SimpoParams, SlimeParams};

    /// Sums -4 over 4 chosen tokens (A_w = -1), -9 over 3 rejected tokens (A_l = -3).
    fn sums() -> PairLogps {
        PairLogps { pair: 7, chosen_logp: -4.0, rejected_logp: -9.0, chosen_tokens: 4, rejected_tokens: 3 }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn reference_free_margins_and_targets() {
        let slime = Objective::Slime(SlimeParams::paper());
        assert!(close(objective_margin(&slime, &sums(), None).expect("slime"), 2.0));
        assert_eq!(objective_target(&slime).expect("target"), 1.5);
        let soft_only = Objective::Slime(SlimeParams { use_hard_margin: false, ..SlimeParams::paper() });
        assert_eq!(objective_target(&soft_only).expect("target"), 1.0);

        let simpo = Objective::Simpo(SimpoParams { beta: 2.5, gamma_beta_ratio: 0.4, label_smoothing: 0.0 });
        assert!(close(objective_margin(&simpo, &sums(), None).expect("simpo"), 5.0));
        assert!(close(objective_target(&simpo).expect("target"), 1.0));

        let cpo = Objective::Cpo(CpoParams { beta: 0.1, ..CpoParams::default() });
        assert!(close(objective_margin(&cpo, &sums(), None).expect("cpo"), 0.5));
        assert_eq!(objective_target(&cpo).expect("target"), 0.0);
        let cpo_simpo = Objective::Cpo(CpoParams {
            beta: 2.0,
            variant: CpoVariant::CpoSimpo,
            simpo_gamma: 0.7,
            ..CpoParams::default()
        });
        assert!(close(objective_margin(&cpo_simpo, &sums(), None).expect("cpo-simpo"), 4.0));
        assert_eq!(objective_target(&cpo_simpo).expect("target"), 0.7);

        // ORPO: (-1 + 3) - (ln(1 - e^-1) - ln(1 - e^-3)).
        let orpo = Objective::Orpo(OrpoParams::default());
        let expected = 2.0 - ((1.0 - (-1.0f64).exp()).ln() - (1.0 - (-3.0f64).exp()).ln());
        assert!(close(objective_margin(&orpo, &sums(), None).expect("orpo"), expected));
    }

    #[test]
    fn reference_margins_follow_the_policy_not_the_raw_margin() {
        let dpo = Objective::Dpo(DpoParams { beta: 0.5, ..DpoParams::default() });
        // The policy prefers chosen by 5 nats, the reference by 7: the policy has moved against
        // the preference, so DPO's margin is negative although A_w > A_l.
        let m = objective_margin(&dpo, &sums(), Some((-3.0, -10.0))).expect("dpo");
        assert!(close(m, 0.5 * ((-4.0 + 3.0) - (-9.0 + 10.0))), "{m}");
        assert!(m < 0.0);
        assert_eq!(objective_target(&dpo).expect("target"), 0.0);
        let hinge = Objective::Dpo(DpoParams { loss: DpoLossType::Hinge, ..DpoParams::default() });
        assert_eq!(objective_target(&hinge).expect("target"), 1.0);

        let ipo = Objective::Ipo(IpoParams { beta: 0.25 });
        let m = objective_margin(&ipo, &sums(), Some((-3.0, -10.0))).expect("ipo");
        assert!(close(m, (-4.0 + 3.0) / 4.0 - (-9.0 + 10.0) / 3.0), "{m}");
        assert_eq!(objective_target(&ipo).expect("target"), 2.0);

        let missing = objective_margin(&dpo, &sums(), None).expect_err("no reference").to_string();
        assert!(missing.contains("reference") && missing.contains("pair 7"), "{missing}");
    }

    #[test]
    fn sft_has_no_margin() {
        let sft = Objective::Sft(SftParams::default());
        assert!(objective_target(&sft).expect_err("sft").to_string().contains("sft has no margin"));
        assert!(objective_margin(&sft, &sums(), None).is_err());
    }
}
