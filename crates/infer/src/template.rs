//! Chat templates: a model's own `tokenizer.chat_template`, rendered with minijinja.
//!
//! Hugging Face templates are Jinja written against Python, so the environment adds
//! Python's string and dict methods (`minijinja-contrib`'s pycompat) and the
//! `raise_exception` helper. A model without a template gets llama.cpp's fallback,
//! ChatML, so prompts match what llama.cpp would send. Rendering runs with a fuel limit,
//! so a hostile template in a downloaded file cannot loop forever.

use kith_types::ChatMessage;
use minijinja::{Environment, ErrorKind, Value};

use crate::error::{GenerateError, LoadError};

/// llama.cpp's fallback when a model has no template (`--jinja` without a template).
pub(crate) const CHATML_TEMPLATE: &str = "{%- for message in messages -%}\n  {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n  {{- '<|im_start|>assistant\n' -}}\n{%- endif -%}";

/// llama.cpp's built-in `gemma` format: no system role (system text opens the next user
/// turn), `assistant` is called `model`, contents are trimmed.
pub(crate) const GEMMA_TEMPLATE: &str = "{%- set ns = namespace(system='') -%}\
{%- for message in messages -%}\
{%- if message.role == 'system' -%}{%- set ns.system = ns.system + (message.content | trim) -%}\
{%- else -%}\
{%- set role = 'model' if message.role == 'assistant' else message.role -%}\
{{- '<start_of_turn>' + role + '\n' -}}\
{%- if ns.system and role != 'model' -%}{{- ns.system + '\n\n' -}}{%- set ns.system = '' -%}{%- endif -%}\
{{- (message.content | trim) + '<end_of_turn>\n' -}}\
{%- endif -%}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}";

/// Instructions a template may execute per render; generous for real templates.
const TEMPLATE_FUEL: u64 = 5_000_000;

/// Where a template came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TemplateSource {
    /// The model file's own `tokenizer.chat_template`.
    Model,
    /// Built-in ChatML, used when the model has none.
    ChatMlFallback,
    /// A named built-in format the user chose.
    Builtin(&'static str),
}

/// A compiled chat template with the special-token spellings it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    strip_leading_bos: bool,
    source: TemplateSource,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("source", &self.source).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `strip_leading_bos` is set when the tokenizer adds BOS itself:
    /// then a BOS the template writes first is cut, as llama.cpp does, to avoid two.
    pub fn new(
        source_text: &str,
        source: TemplateSource,
        bos_token: &str,
        eos_token: &str,
        strip_leading_bos: bool,
    ) -> Result<Self, LoadError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function("raise_exception", |message: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source_text.to_owned())
            .map_err(|err| LoadError::Template(format!("{err:#}")))?;
        Ok(Self { env, bos_token: bos_token.to_owned(), eos_token: eos_token.to_owned(), strip_leading_bos, source })
    }

    /// A built-in template by name: `chatml` or `gemma`.
    pub fn builtin(name: &str, bos_token: &str, eos_token: &str, strip_leading_bos: bool) -> Result<Self, LoadError> {
        let (text, name) = match name {
            "chatml" => (CHATML_TEMPLATE, "chatml"),
            "gemma" => (GEMMA_TEMPLATE, "gemma"),
            other => {
                return Err(LoadError::Template(format!("unknown built-in template {other:?} (known: chatml, gemma)")));
            }
        };
        Self::new(text, TemplateSource::Builtin(name), bos_token, eos_token, strip_leading_bos)
    }

    /// Where this template came from.
    pub fn source(&self) -> TemplateSource {
        self.source
    }

    /// Renders `messages` into the prompt string the model expects.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, GenerateError> {
        let template = self.env.get_template("chat").map_err(|err| GenerateError::Template(format!("{err:#}")))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|message| minijinja::context! { role => message.role.as_str(), content => message.content.as_str() })
            .collect();
        let rendered = template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|err| GenerateError::Template(format!("{err:#}")))?;
        if self.strip_leading_bos
            && !self.bos_token.is_empty()
            && let Some(rest) = rendered.strip_prefix(self.bos_token.as_str())
        {
            return Ok(rest.to_owned());
        }
        Ok(rendered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &ChatTemplate, messages: &[ChatMessage]) -> String {
        template.render(messages, true).expect("renders")
    }

    #[test]
    fn gemma_merges_system_into_first_user_turn() {
        let template = ChatTemplate::builtin("gemma", "<bos>", "<eos>", true).expect("compiles");
        let out = render(&template, &[ChatMessage::system(" Be brief. "), ChatMessage::user("Hi ")]);
        assert_eq!(out, "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let template =
            ChatTemplate::new("{{ raise_exception('no system role') }}", TemplateSource::Model, "", "", false)
                .expect("compiles");
        let err = template.render(&[ChatMessage::user("x")], true).expect_err("raises");
        assert!(err.to_string().contains("no system role"), "{err}");
    }

    #[test]
    fn looping_template_runs_out_of_fuel() {
        let source = "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}";
        let template = ChatTemplate::new(source, TemplateSource::Model, "", "", false).expect("compiles");
        assert!(template.render(&[], true).is_err());
    }

    #[test]
    fn python_string_methods_work() {
        let source = "{{ messages[0].content.strip().upper() }}";
        let template = ChatTemplate::new(source, TemplateSource::Model, "", "", false).expect("compiles");
        assert_eq!(render(&template, &[ChatMessage::user("  hi ")]), "HI");
    }

    #[test]
    fn leading_bos_is_cut_when_the_tokenizer_adds_it() {
        let source = "{{ bos_token }}{{ messages[0].content }}";
        let template = ChatTemplate::new(source, TemplateSource::Model, "<s>", "</s>", true).expect("compiles");
        assert_eq!(render(&template, &[ChatMessage::user("hi")]), "hi");
    }
}
