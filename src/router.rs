//! Which backend answers a request: by the model it names, and for the student's model in
//! hybrid mode by the configured policy, with the other backend as the fallback.

use crate::config::{Config, Mode, Policy, TeacherRoute};

/// Where a request can go: the local student, or the teacher under an upstream model name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Student,
    /// The teacher, asked for this upstream model.
    Teacher {
        upstream_model: String,
    },
}

impl Route {
    /// The `x-duet-backend` header value.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Student => "student",
            Self::Teacher { .. } => "teacher",
        }
    }
}

/// Where a request goes first, and where it may go if that fails before answering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub first: Route,
    pub fallback: Option<Route>,
}

/// The routing table, built once from the configuration.
pub struct Router {
    mode: Mode,
    policy: Policy,
    student_name: String,
    /// Client-facing teacher model names -> upstream names, in listing order.
    teacher_models: Vec<TeacherRoute>,
    teacher_default: String,
}

impl Router {
    pub fn new(config: &Config) -> Self {
        let mut teacher_models: Vec<TeacherRoute> = vec![];
        if config.mode != Mode::Student {
            let model = config.teacher.model.trim();
            let routes = std::iter::once(TeacherRoute::new(model, model))
                .chain(config.teacher.models.iter().cloned());
            for route in routes {
                if !teacher_models.iter().any(|r| r.name == route.name) {
                    teacher_models.push(route);
                }
            }
        }
        Self {
            mode: config.mode,
            policy: config.teacher.policy,
            student_name: config.student_name(),
            teacher_models,
            teacher_default: config.teacher.model.clone(),
        }
    }

    /// The plan for a request naming `model`.
    pub fn plan(&self, model: &str) -> Option<Plan> {
        let teacher = |upstream: &str| Route::Teacher {
            upstream_model: upstream.to_string(),
        };
        let only = |first| {
            Some(Plan {
                first,
                fallback: None,
            })
        };
        match self.mode {
            Mode::Student if model == self.student_name => only(Route::Student),
            Mode::Student => None,
            Mode::Teacher => match self.upstream_for(model) {
                Some(upstream) => only(teacher(upstream)),
                // Clients set up for the local model keep working in teacher-only mode.
                None if model == self.student_name => only(teacher(&self.teacher_default)),
                // Anything else is the teacher's to accept or refuse.
                None => only(teacher(model)),
            },
            Mode::Hybrid if model == self.student_name => Some(match self.policy {
                Policy::StudentFirst => Plan {
                    first: Route::Student,
                    fallback: Some(teacher(&self.teacher_default)),
                },
                Policy::TeacherFirst => Plan {
                    first: teacher(&self.teacher_default),
                    fallback: Some(Route::Student),
                },
            }),
            Mode::Hybrid => only(teacher(self.upstream_for(model).unwrap_or(model))),
        }
    }

    /// The upstream name of a listed teacher model.
    fn upstream_for(&self, model: &str) -> Option<&str> {
        self.teacher_models
            .iter()
            .find(|r| r.name == model)
            .map(|r| r.upstream.as_str())
    }

    /// The model ids `/v1/models` lists.
    pub fn model_ids(&self) -> Vec<String> {
        let student = (self.mode != Mode::Teacher).then(|| self.student_name.clone());
        student
            .into_iter()
            .chain(self.teacher_models.iter().map(|r| r.name.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(mode: Mode, policy: Policy) -> Router {
        let mut config = Config {
            mode,
            ..Config::default()
        };
        config.student.name = "local".into();
        config.teacher.model = "big".into();
        config.teacher.models = vec![
            TeacherRoute::new("fast", "small-v2"),
            TeacherRoute::new("other", "other"),
        ];
        config.teacher.policy = policy;
        Router::new(&config)
    }

    fn teacher(m: &str) -> Route {
        Route::Teacher {
            upstream_model: m.into(),
        }
    }

    #[test]
    fn student_mode_serves_only_the_student() {
        let r = router(Mode::Student, Policy::StudentFirst);
        assert_eq!(
            r.plan("local"),
            Some(Plan {
                first: Route::Student,
                fallback: None
            })
        );
        assert_eq!(r.plan("big"), None);
        assert_eq!(r.model_ids(), vec!["local"]);
    }

    #[test]
    fn teacher_mode_sends_everything_upstream_with_mapping() {
        let r = router(Mode::Teacher, Policy::StudentFirst);
        assert_eq!(r.plan("local").unwrap().first, teacher("big"));
        assert_eq!(r.plan("fast").unwrap().first, teacher("small-v2"));
        assert_eq!(r.plan("unlisted").unwrap().first, teacher("unlisted"));
        assert_eq!(r.model_ids(), vec!["big", "fast", "other"]);
    }

    #[test]
    fn hybrid_routes_by_name_and_policy() {
        let r = router(Mode::Hybrid, Policy::StudentFirst);
        assert_eq!(
            r.plan("local"),
            Some(Plan {
                first: Route::Student,
                fallback: Some(teacher("big"))
            })
        );
        assert_eq!(
            r.plan("fast"),
            Some(Plan {
                first: teacher("small-v2"),
                fallback: None
            })
        );
        let r = router(Mode::Hybrid, Policy::TeacherFirst);
        assert_eq!(
            r.plan("local"),
            Some(Plan {
                first: teacher("big"),
                fallback: Some(Route::Student)
            })
        );
        assert_eq!(r.model_ids(), vec!["local", "big", "fast", "other"]);
    }
}
