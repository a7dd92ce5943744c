//! What each active sequence runs in the next forward pass: every decoding sequence its next
//! token, and the prompts still being read a share of the prefill budget, earliest first.
//! A pure function, so the policy is tested without a model.

/// Decides how many tokens each sequence runs in the next pass. `prefill_left` gives, in
/// arrival order, the tokens each sequence still has to run before it can sample (1 for a
/// decoding sequence); `prefill_budget` bounds the prompt tokens of the whole pass. Writes
/// one count per sequence to `plan` (0: it waits for a later pass).
pub fn plan_pass(
    prefill_left: impl IntoIterator<Item = usize>,
    prefill_budget: usize,
    plan: &mut Vec<usize>,
) {
    plan.clear();
    let mut room = prefill_budget;
    for left in prefill_left {
        let n = match left {
            // A decoding sequence's next token, or a prompt's last one: never held back, so a
            // long prompt cannot stall the streams already running.
            1 => 1,
            left => {
                let n = left.min(room);
                room -= n;
                n
            }
        };
        plan.push(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(left: &[usize], budget: usize) -> Vec<usize> {
        let mut out = Vec::new();
        plan_pass(left.iter().copied(), budget, &mut out);
        out
    }

    #[test]
    fn decoding_sequences_always_run_one_token() {
        assert_eq!(plan(&[1, 1, 1, 1], 256), vec![1, 1, 1, 1]);
        assert_eq!(plan(&[1, 1], 0), vec![1, 1]);
    }

    #[test]
    fn prompts_share_the_budget_in_arrival_order() {
        assert_eq!(plan(&[1, 300, 1, 100], 256), vec![1, 256, 1, 0]);
        assert_eq!(plan(&[100, 1, 200], 256), vec![100, 1, 156]);
        assert_eq!(plan(&[40, 50], 256), vec![40, 50]);
    }

    #[test]
    fn the_plan_is_rebuilt_each_time() {
        let mut out = vec![9, 9, 9];
        plan_pass([1], 8, &mut out);
        assert_eq!(out, vec![1]);
    }
}
