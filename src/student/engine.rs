//! The engine thread: owns the loaded model, takes one job at a time from a bounded
//! queue, and streams each job's tokens back through its own channel. Model work never
//! runs on an HTTP worker; a job whose receiver is gone stops at the next token.

use std::collections::HashSet;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::detokenizer::Detokenizer;
use super::gguf::{self, GgufHeader};
use super::model::{KvCache, Transformer};
use super::sampler::Sampler;
use super::stop::{StopMatcher, StopScan};
use super::template::ChatTemplate;
use super::tokenizer::StudentTokenizer;
use super::{LoadState, StudentStatus, source};
use crate::backend::{ChatMessage, FinishReason, GenEvent, GenerationRequest, Usage};
use crate::config::StudentConfig;
use crate::error::DuetError;

/// A request waiting for the engine, with where its answer goes.
pub struct Job {
    pub request: GenerationRequest,
    /// Resolved with the prompt's token count once prefill is done (or with the error).
    pub started: oneshot::Sender<Result<u32, DuetError>>,
    pub events: mpsc::Sender<GenEvent>,
}

/// Prompt tokens run through the model per forward pass; bounds the attention scores'
/// memory for long prompts.
const PREFILL_CHUNK: usize = 256;

/// Used when a GGUF carries no chat template: ChatML, what most small chat models use.
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Everything loaded for the student, shared by all its sequences.
pub struct LoadedModel {
    pub model: Transformer,
    pub tokenizer: StudentTokenizer,
    pub template: ChatTemplate,
    /// Tokens that end the assistant's turn (EOS and the template's end-of-turn marker).
    pub end_tokens: HashSet<u32>,
    /// Bytes of all weights as stored in the GGUF (and held in memory).
    pub weight_bytes: u64,
}

impl LoadedModel {
    /// Reads the model named by `config.model` (fetching it first if it is a hub reference).
    pub fn load(config: &StudentConfig) -> Result<Self, DuetError> {
        let path = source::resolve(&config.model)?;
        let mut header = GgufHeader::read(&path)?;
        let tokenizer = StudentTokenizer::load(&path, &header)?;
        // The parsed vocabulary and merges are hundreds of thousands of small strings the
        // tokenizer now holds its own copy of: free them before the weights arrive.
        header.drop_tokenizer_metadata();
        crate::memory::release_free_memory();
        let template_source = match gguf::string(header.metadata(), "tokenizer.chat_template") {
            Ok(t) => t,
            Err(_) => {
                tracing::warn!("the GGUF has no chat template; using ChatML");
                CHATML.to_string()
            }
        };
        let text_of = |id: Option<u32>| {
            id.and_then(|id| tokenizer.token_text(id))
                .unwrap_or_default()
        };
        let template = ChatTemplate::new(
            &template_source,
            text_of(tokenizer.bos),
            text_of(tokenizer.eos),
        )?;
        let mut end_tokens: HashSet<u32> = tokenizer.eos.into_iter().collect();
        end_tokens.extend(gguf::opt_u32(
            header.metadata(),
            "tokenizer.ggml.eot_token_id",
        ));
        if let Some(id) = template
            .end_of_turn_text()
            .and_then(|t| tokenizer.special_id(&t))
        {
            end_tokens.insert(id);
        }
        let trained = super::model::ModelShape::from_header(&header)?.trained_context;
        let model = Transformer::load(&path, &header, config.context_length.min(trained))?;
        Ok(Self {
            model,
            tokenizer,
            template,
            end_tokens,
            weight_bytes: header.tensor_bytes(),
        })
    }

    /// The prompt's token ids for a conversation, as the model's template renders it.
    pub fn prompt_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, DuetError> {
        self.tokenizer.encode(&self.template.render(messages)?)
    }
}

/// Starts the engine thread and returns the sending half of its bounded job queue.
pub fn spawn(config: StudentConfig, status: Arc<Mutex<StudentStatus>>) -> SyncSender<Job> {
    let (tx, rx) = sync_channel(config.queue_size);
    std::thread::Builder::new()
        .name("duet-engine".into())
        .spawn(move || run(config, status, rx))
        .expect("spawn the engine thread");
    tx
}

fn run(config: StudentConfig, status: Arc<Mutex<StudentStatus>>, jobs: Receiver<Job>) {
    let mut loaded: Option<LoadedModel> = None;
    // Ends when every Student handle is dropped.
    while let Ok(job) = jobs.recv() {
        if job.started.is_closed() {
            continue; // the client left while queued
        }
        if loaded.is_none() {
            if let Some(reason) = failed_reason(&status) {
                let _ = job.started.send(Err(DuetError::ModelLoad(reason)));
                continue;
            }
            loaded = load(&config, &status);
        }
        match &loaded {
            Some(model) => {
                let outcome = serve(model, &config, job);
                let mut status = status.lock().expect("status lock");
                match outcome {
                    Outcome::Completed => status.completed += 1,
                    Outcome::Cancelled => status.cancelled += 1,
                    Outcome::Failed => {}
                }
            }
            None => {
                let reason = failed_reason(&status).unwrap_or_default();
                let _ = job.started.send(Err(DuetError::ModelLoad(reason)));
            }
        }
    }
}

fn failed_reason(status: &Mutex<StudentStatus>) -> Option<String> {
    match &status.lock().expect("status lock").state {
        LoadState::Failed { reason } => Some(reason.clone()),
        _ => None,
    }
}

fn load(config: &StudentConfig, status: &Mutex<StudentStatus>) -> Option<LoadedModel> {
    status.lock().expect("status lock").state = LoadState::Loading;
    let started = Instant::now();
    let result = LoadedModel::load(config);
    crate::memory::release_free_memory();
    let mut status = status.lock().expect("status lock");
    match result {
        Ok(model) => {
            let load_seconds = started.elapsed().as_secs_f64();
            let weight_bytes = model.weight_bytes;
            tracing::info!(model = %status.model, load_seconds, "student loaded");
            status.loads += 1;
            status.state = LoadState::Ready {
                load_seconds,
                weight_bytes,
                context_length: model.model.context(),
                kv_bytes_per_token: model.model.shape.kv_bytes_per_token(),
            };
            Some(model)
        }
        Err(e) => {
            let reason = match e {
                DuetError::ModelLoad(reason) => reason,
                other => other.to_string(),
            };
            tracing::error!(%reason, "student failed to load");
            status.state = LoadState::Failed { reason };
            None
        }
    }
}

/// How a job ended, for the counters in `/health`.
#[derive(Debug, PartialEq)]
enum Outcome {
    Completed,
    /// The client went away; generation stopped at the next token.
    Cancelled,
    /// The request could not be served (refused or failed); the client was told why.
    Failed,
}

/// Runs one job to its end: prefill, then sample/detokenize/stop-check per token.
fn serve(m: &LoadedModel, config: &StudentConfig, job: Job) -> Outcome {
    let Job {
        request,
        started,
        events,
    } = job;
    let (prompt, max_tokens) = match prepare(m, config, &request) {
        Ok(p) => p,
        Err(e) => {
            let _ = started.send(Err(e));
            return Outcome::Failed;
        }
    };
    let mut cache = KvCache::new(m.model.shape.layers);
    let mut logits = Vec::new();
    for chunk in prompt.chunks(PREFILL_CHUNK) {
        if started.is_closed() {
            return Outcome::Cancelled;
        }
        match m.model.forward(chunk, &mut cache) {
            Ok(l) => logits = l,
            Err(e) => {
                let _ = started.send(Err(DuetError::Internal(format!("prefill: {e}"))));
                return Outcome::Failed;
            }
        }
    }
    let prompt_tokens = prompt.len() as u32;
    if started.send(Ok(prompt_tokens)).is_err() {
        return Outcome::Cancelled;
    }

    let mut sampler = Sampler::new(request.sampling.clone());
    let mut detokenizer = Detokenizer::default();
    let mut stops = StopMatcher::new(request.stop.clone());
    let mut completion_tokens = 0u32;
    // A failed send means the receiver is gone: the client disconnected.
    let send = |text: String| text.is_empty() || events.blocking_send(GenEvent::Text(text)).is_ok();
    let mut matched_stop_sequence = false;
    let finish_reason = loop {
        let token = sampler.sample(&mut logits);
        if m.end_tokens.contains(&token) {
            break FinishReason::Stop;
        }
        completion_tokens += 1;
        if !m.tokenizer.is_special(token) {
            let (text, stopped) = match stops.push(&detokenizer.push(m.tokenizer.bytes(token))) {
                StopScan::Emit(t) => (t, false),
                StopScan::Stopped(t) => (t, true),
            };
            if !send(text) {
                return Outcome::Cancelled;
            }
            if stopped {
                matched_stop_sequence = true;
                break FinishReason::Stop;
            }
        }
        if completion_tokens as usize >= max_tokens {
            break FinishReason::Length;
        }
        if events.is_closed() {
            return Outcome::Cancelled;
        }
        match m.model.forward(&[token], &mut cache) {
            Ok(l) => logits = l,
            Err(e) => {
                let _ = events
                    .blocking_send(GenEvent::Error(DuetError::Internal(format!("decode: {e}"))));
                return Outcome::Failed;
            }
        }
    };
    if !matched_stop_sequence {
        // Whatever was held back for a possible stop sequence is part of the answer.
        let rest = stops.finish();
        if !send(rest) {
            return Outcome::Cancelled;
        }
    }
    let done = GenEvent::Done {
        finish_reason,
        usage: Usage::new(prompt_tokens, completion_tokens),
    };
    if events.blocking_send(done).is_err() {
        return Outcome::Cancelled;
    }
    Outcome::Completed
}

/// The prompt's tokens and how many may be generated, or why the request cannot fit.
fn prepare(
    m: &LoadedModel,
    config: &StudentConfig,
    request: &GenerationRequest,
) -> Result<(Vec<u32>, usize), DuetError> {
    let prompt = m.prompt_tokens(&request.messages)?;
    let context = m.model.context();
    let room = context.saturating_sub(prompt.len());
    let max_tokens = match request.max_tokens {
        Some(n) if n > room || room == 0 => {
            return Err(DuetError::ContextLengthExceeded {
                context,
                prompt_tokens: prompt.len(),
                max_tokens: n,
            });
        }
        Some(n) => n,
        None if room == 0 => {
            return Err(DuetError::ContextLengthExceeded {
                context,
                prompt_tokens: prompt.len(),
                max_tokens: 1,
            });
        }
        None => config.max_new_tokens.min(room),
    };
    Ok((prompt, max_tokens))
}
