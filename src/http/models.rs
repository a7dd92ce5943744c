//! `GET /v1/models` and `GET /v1/models/{id}`: the model ids duet answers to, listed
//! without loading any weights.

use actix_web::{HttpResponse, web};

use super::AppState;
use crate::error::DuetError;
use crate::openai::types::{ModelCard, ModelList};

fn cards(state: &AppState) -> Vec<ModelCard> {
    let card = |id| ModelCard {
        id,
        object: "model",
        created: state.started_at,
        owned_by: "duet",
    };
    state.router.model_ids().into_iter().map(card).collect()
}

pub async fn list(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(ModelList {
        object: "list",
        data: cards(&state),
    })
}

pub async fn get(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, DuetError> {
    let id = id.into_inner();
    cards(&state)
        .into_iter()
        .find(|c| c.id == id)
        .map(|c| HttpResponse::Ok().json(c))
        .ok_or(DuetError::ModelNotFound(id))
}
