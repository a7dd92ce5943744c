//! The Python app's environment variables (`STUDENT_BASE_MODEL`, `ENABLE_HYBRID`, ...):
//! which duet setting each one sets, and which are refused with a reason.

use super::ConfigError;

/// The Python app's environment variables and what duet makes of them.
pub(super) fn legacy_variable(
    name: &str,
    value: &str,
) -> Result<Option<(&'static str, String)>, ConfigError> {
    let on = |v: &str| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    };
    Ok(match name {
        "STUDENT_BASE_MODEL" => Some(("student.model", value.to_string())),
        "TEACHER_BASE_URL" => Some(("teacher.base_url", value.to_string())),
        "TEACHER_MODEL" => Some(("teacher.model", value.to_string())),
        "STUDENT_MAX_NEW_TOKENS" => Some(("student.max_new_tokens", value.to_string())),
        // duet runs the student on the CPU; both values are accepted.
        "STUDENT_FORCE_CPU" => {
            if !on(value) {
                tracing::info!(
                    "STUDENT_FORCE_CPU=0: duet has no GPU backend, the student runs on the CPU"
                );
            }
            None
        }
        // bitsandbytes' 4-bit NF4 becomes Q4_K_M, the app's fp16 profile Q8_0: both for
        // transformers checkpoints; a GGUF keeps its own types.
        "STUDENT_LOAD_IN_4BIT" if on(value) => Some(("student.quantization", "q4_k_m".into())),
        "STUDENT_LOAD_IN_4BIT" => Some(("student.quantization", "q8_0".into())),
        // The Python app's hybrid switch: on means both backends, off means teacher only.
        "ENABLE_HYBRID" if on(value) => Some(("mode", "hybrid".into())),
        "ENABLE_HYBRID" => Some(("mode", "teacher".into())),
        "FORCE_STUDENT_STUB" if !on(value) => None,
        "FORCE_STUDENT_STUB" => {
            return Err(ConfigError(
                "FORCE_STUDENT_STUB=1 is refused: duet has no stub mode, every answer comes from the real model".into(),
            ));
        }
        "STUDENT_LORA_DIR" => Some(("student.lora_dir", value.trim().to_string())),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{env, existing_model};
    use crate::config::{Mode, Policy, Quantization, TeacherRoute, load};

    #[test]
    fn python_app_variables_are_honoured_or_refused_with_a_reason() {
        let model = existing_model();
        let c = load(
            None,
            env(&[
                ("STUDENT_BASE_MODEL", &model),
                ("STUDENT_FORCE_CPU", "1"),
                ("STUDENT_LOAD_IN_4BIT", "1"),
                ("FORCE_STUDENT_STUB", "0"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.student.model, model);
        assert_eq!(c.student.quantization, Quantization::Q4KM);
        let c = load(
            None,
            env(&[
                ("STUDENT_LOAD_IN_4BIT", "0"),
                ("STUDENT_BASE_MODEL", &model),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.student.quantization, Quantization::Q8_0);
        for (var, value) in [
            ("FORCE_STUDENT_STUB", "1"),
            ("STUDENT_LORA_DIR", "/adapters"),
        ] {
            let err = load(
                None,
                env(&[(var, value), ("STUDENT_BASE_MODEL", &model)]),
                &[],
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(var), "{var}: {err}");
        }
    }

    #[test]
    fn teacher_settings_and_the_hybrid_switch() {
        let model = existing_model();
        let c = load(
            None,
            env(&[
                ("ENABLE_HYBRID", "0"),
                ("TEACHER_BASE_URL", "http://127.0.0.1:9/v1"),
                ("TEACHER_MODEL", "big"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Teacher, "teacher mode needs no model file");
        assert_eq!(c.teacher.base_url, "http://127.0.0.1:9/v1");
        assert_eq!(c.teacher.model, "big");
        let c = load(
            None,
            env(&[
                ("ENABLE_HYBRID", "1"),
                ("STUDENT_BASE_MODEL", &model),
                ("DUET_TEACHER_MODELS", "gpt-4o, fast=gpt-4o-mini"),
                ("DUET_TEACHER_POLICY", "teacher-first"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Hybrid);
        assert_eq!(
            c.teacher.models,
            vec![
                TeacherRoute::new("gpt-4o", "gpt-4o"),
                TeacherRoute::new("fast", "gpt-4o-mini")
            ]
        );
        assert_eq!(c.teacher.policy, Policy::TeacherFirst);
        let c = load(
            None,
            env(&[
                ("DUET_MODE", "hybrid"),
                ("ENABLE_HYBRID", "0"),
                ("STUDENT_BASE_MODEL", &model),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Hybrid, "DUET_MODE wins over ENABLE_HYBRID");
        let err = load(
            None,
            env(&[
                ("DUET_MODE", "teacher"),
                ("DUET_TEACHER_BASE_URL", "ftp://x"),
            ]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("teacher.base_url"), "{err}");
        let err = load(None, env(&[("DUET_MODE", "solo")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("mode") && err.contains("solo"), "{err}");
    }
}
