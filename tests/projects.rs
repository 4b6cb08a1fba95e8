//! Projects as code against a fake Projects API: plan, apply, ids written back, idempotence.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt as _;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use mantlegate::config::Config;
use mantlegate::projects::{self, Api, Plan};
use mantlegate::state::Snapshot;

const ADMIN_KEY: &str = "bedrock-api-key-admin-test";
const ADMIN_ENV: &str = "MG_TEST_PROJECTS_ADMIN_KEY";

/// One call the fake received.
#[derive(Debug, Clone)]
struct Call {
    method: &'static str,
    path: String,
    query: HashMap<String, String>,
    body: Value,
}

/// The fake account: projects in creation order, and every call made.
struct Account {
    projects: Vec<Value>,
    calls: Vec<Call>,
    next_id: u32,
    /// Largest page served, whatever `limit` asks.
    page_size: usize,
    /// Serve archived projects in the list too (whether Mantle does is unverified).
    list_archived: bool,
    /// A create with this name fails with a 500 and a non-JSON body.
    fail_create: Option<String>,
    /// Creates answer with this id instead of a fresh one.
    create_id: Option<String>,
    /// How the list answers.
    listing: Listing,
}

/// How the fake answers a list call.
#[derive(Clone)]
enum Listing {
    /// The account's projects, paged.
    Pages,
    /// A valid page padded past 16 MiB, streamed in 64 KiB chunks.
    Huge,
    /// The head and the start of a page, then nothing, ever.
    Stalled,
    /// A 400 with this message.
    Error(String),
}

type Shared = Arc<Mutex<Account>>;

fn project(id: &str, name: &str, tags: &[(&str, &str)]) -> Value {
    let tags: serde_json::Map<String, Value> = tags
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    json!({
        "id": id,
        "object": "organization.project",
        "name": name,
        "arn": format!("arn:aws:bedrock-mantle:us-east-1:123456789012:project/{id}"),
        "created_at": 1_772_135_628,
        "status": "active",
        "tags": tags,
        "data_retention": {"mode": "inherit"},
    })
}

fn default_project() -> Value {
    project("default", "Default", &[])
}

fn openai_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}})),
    )
        .into_response()
}

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {ADMIN_KEY}"))
}

fn record(
    account: &mut Account,
    method: &'static str,
    path: String,
    query: HashMap<String, String>,
    body: Value,
) {
    account.calls.push(Call {
        method,
        path,
        query,
        body,
    });
}

async fn list(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let mut a = shared.lock().expect("lock");
    record(
        &mut a,
        "GET",
        "/v1/organization/projects".into(),
        query.clone(),
        Value::Null,
    );
    if !authorized(&headers) {
        return openai_error(StatusCode::UNAUTHORIZED, "Invalid API key provided");
    }
    match a.listing.clone() {
        Listing::Pages => {}
        Listing::Huge => return huge_page(),
        Listing::Stalled => {
            let start = futures_util::stream::once(async {
                Ok::<_, std::io::Error>(bytes::Bytes::from_static(
                    b"{\"object\":\"list\",\"data\":[",
                ))
            });
            let body = start.chain(futures_util::stream::pending());
            return axum::body::Body::from_stream(body).into_response();
        }
        Listing::Error(message) => return openai_error(StatusCode::BAD_REQUEST, &message),
    }
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(20);
    let visible: Vec<&Value> = a
        .projects
        .iter()
        .filter(|p| a.list_archived || p["status"] == "active")
        .collect();
    let start = match query.get("after") {
        Some(after) => visible
            .iter()
            .position(|p| p["id"] == after.as_str())
            .map_or(visible.len(), |i| i + 1),
        None => 0,
    };
    let page: Vec<Value> = visible
        .iter()
        .skip(start)
        .take(limit.min(a.page_size))
        .map(|p| (*p).clone())
        .collect();
    let has_more = start + page.len() < visible.len();
    Json(json!({
        "object": "list",
        "data": page,
        "first_id": page.first().map(|p| p["id"].clone()),
        "last_id": page.last().map(|p| p["id"].clone()),
        "has_more": has_more,
    }))
    .into_response()
}

/// A valid empty last page with a 17 MiB field, made as it is sent (never held whole).
fn huge_page() -> Response {
    const CHUNK: usize = 64 << 10;
    let head = futures_util::stream::once(async {
        Ok::<_, std::io::Error>(bytes::Bytes::from_static(
            b"{\"object\":\"list\",\"data\":[],\"has_more\":false,\"pad\":\"",
        ))
    });
    let pad = futures_util::stream::iter(0..(17 << 20) / CHUNK)
        .map(|_| Ok(bytes::Bytes::from(vec![b'x'; CHUNK])));
    let tail = futures_util::stream::once(async { Ok(bytes::Bytes::from_static(b"\"}")) });
    axum::body::Body::from_stream(head.chain(pad).chain(tail)).into_response()
}

async fn create(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut a = shared.lock().expect("lock");
    record(
        &mut a,
        "POST",
        "/v1/organization/projects".into(),
        HashMap::new(),
        body.clone(),
    );
    if !authorized(&headers) {
        return openai_error(StatusCode::UNAUTHORIZED, "Invalid API key provided");
    }
    let name = body["name"].as_str().unwrap_or_default().to_owned();
    if a.fail_create.as_deref() == Some(name.as_str()) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "<html><body>upstream exploded</body></html>",
        )
            .into_response();
    }
    a.next_id += 1;
    let id = a
        .create_id
        .clone()
        .unwrap_or_else(|| format!("proj_fake{:04}", a.next_id));
    let mut p = project(&id, &name, &[]);
    p["tags"] = body.get("tags").cloned().unwrap_or_else(|| json!({}));
    a.projects.push(p.clone());
    Json(p).into_response()
}

async fn update(
    State(shared): State<Shared>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Json(body): Json<Value>,
) -> Response {
    let mut a = shared.lock().expect("lock");
    record(
        &mut a,
        "POST",
        format!("/v1/organization/projects/{id}"),
        HashMap::new(),
        body.clone(),
    );
    if !authorized(&headers) {
        return openai_error(StatusCode::UNAUTHORIZED, "Invalid API key provided");
    }
    if id == "default" {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "the default project cannot be changed",
        );
    }
    let Some(p) = a.projects.iter_mut().find(|p| p["id"] == id.as_str()) else {
        return openai_error(
            StatusCode::NOT_FOUND,
            &format!("No project found with id '{id}'"),
        );
    };
    if let Some(add) = body.get("add_tags").and_then(Value::as_object) {
        for (k, v) in add {
            p["tags"][k] = v.clone();
        }
    }
    if let Some(remove) = body.get("remove_tag_keys").and_then(Value::as_array) {
        for k in remove.iter().filter_map(Value::as_str) {
            p["tags"].as_object_mut().expect("tags").remove(k);
        }
    }
    Json(p.clone()).into_response()
}

async fn archive(
    State(shared): State<Shared>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let mut a = shared.lock().expect("lock");
    record(
        &mut a,
        "POST",
        format!("/v1/organization/projects/{id}/archive"),
        HashMap::new(),
        Value::Null,
    );
    if !authorized(&headers) {
        return openai_error(StatusCode::UNAUTHORIZED, "Invalid API key provided");
    }
    if id == "default" {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "the default project cannot be archived",
        );
    }
    let Some(p) = a.projects.iter_mut().find(|p| p["id"] == id.as_str()) else {
        return openai_error(
            StatusCode::NOT_FOUND,
            &format!("No project found with id '{id}'"),
        );
    };
    p["status"] = json!("archived");
    p["archived_at"] = json!(1_786_614_394);
    Json(p.clone()).into_response()
}

/// A fake Projects API on 127.0.0.1:0 holding `projects`, serving `page_size` per page.
async fn spawn_fake(projects: Vec<Value>, page_size: usize) -> (String, Shared) {
    let shared = Arc::new(Mutex::new(Account {
        projects,
        calls: Vec::new(),
        next_id: 0,
        page_size,
        list_archived: false,
        fail_create: None,
        create_id: None,
        listing: Listing::Pages,
    }));
    let app = Router::new()
        .route("/v1/organization/projects", get(list).post(create))
        .route("/v1/organization/projects/{id}", post(update))
        .route("/v1/organization/projects/{id}/archive", post(archive))
        .with_state(shared.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), shared)
}

/// Calls that change the account.
fn mutations(shared: &Shared) -> Vec<Call> {
    shared
        .lock()
        .expect("lock")
        .calls
        .iter()
        .filter(|c| c.method == "POST")
        .cloned()
        .collect()
}

fn upstream_tags(shared: &Shared, id: &str) -> Value {
    let a = shared.lock().expect("lock");
    a.projects
        .iter()
        .find(|p| p["id"] == id)
        .map(|p| p["tags"].clone())
        .expect("project exists")
}

/// The config's head: upstream at the fake, a tag policy, comments to be kept.
fn head(base: &str) -> String {
    format!(
        r#"# mantlegate: the platform team's config (reviewed in git)

[upstream]
base_url = "{base}"   # the fake Projects API
admin_api_key_env = "{ADMIN_ENV}"

[policy]
required_tags = ["Team"]
"#
    )
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("mantlegate.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn api(base: &str) -> Api {
    Api::new(base, ADMIN_KEY).expect("api")
}

async fn plan_text(api: &Api, path: &Path, archive_missing: bool) -> (Plan, String) {
    let mut out = Vec::new();
    let plan = projects::plan_with(api, path, archive_missing, &mut out)
        .await
        .expect("plan");
    (plan, String::from_utf8(out).expect("utf-8"))
}

async fn apply_text(api: &Api, path: &Path, archive_missing: bool) -> anyhow::Result<String> {
    let mut out = Vec::new();
    projects::apply_with(api, path, archive_missing, &mut out).await?;
    Ok(String::from_utf8(out).expect("utf-8"))
}

#[tokio::test]
async fn apply_creates_projects_and_writes_their_ids_keeping_the_file() {
    let (base, fake) = spawn_fake(
        vec![
            default_project(),
            project("proj_existing", "Existing", &[("Team", "Core")]),
        ],
        2,
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let before = format!(
        r#"{}
# --- projects -------------------------------------------------------------

# The customer-facing chatbot.
[[projects]]
name = "CustomerChatbot-Prod"   # shown in reports
# Cost allocation tags, activated in Billing.
tags = {{ Team = "CX", CostCenter = "CC-1001" }}

[[projects]]
name = "Existing"
id = "proj_existing"
tags = {{ Team = "Core" }}

  [[projects]]
  name = "Search"
  # tags in their own table
  [projects.tags]
  Team = "Search"   # owner

[[keys]]
name = "chatbot-backend"
sha256 = "{}"
projects = ["CustomerChatbot-Prod"]
"#,
        head(&base),
        "ab".repeat(32)
    );
    let path = write_config(&dir, &before);
    let api = api(&base);

    let (plan, text) = plan_text(&api, &path, false).await;
    assert_eq!(plan.creates(), 2, "{text}");
    assert!(text.contains("+ create \"CustomerChatbot-Prod\""), "{text}");
    assert!(text.contains("+ \"CostCenter\" = \"CC-1001\""), "{text}");
    assert!(text.contains("+ create \"Search\""), "{text}");
    assert!(
        text.contains("plan: 2 to create, 0 to update, 0 to archive, 0 unmanaged"),
        "{text}"
    );
    assert!(mutations(&fake).is_empty(), "plan changes nothing");

    let out = apply_text(&api, &path, false).await.expect("apply");
    assert!(
        out.contains("created `CustomerChatbot-Prod`: proj_fake0001"),
        "{out}"
    );
    assert!(out.contains("wrote 2 new id(s)"), "{out}");

    let creates = mutations(&fake);
    assert_eq!(creates.len(), 2, "{creates:?}");
    assert_eq!(creates[0].path, "/v1/organization/projects");
    assert_eq!(
        creates[0].body,
        json!({"name": "CustomerChatbot-Prod", "tags": {"Team": "CX", "CostCenter": "CC-1001"}})
    );
    assert_eq!(
        creates[1].body,
        json!({"name": "Search", "tags": {"Team": "Search"}})
    );

    let after = std::fs::read_to_string(&path).expect("read");
    let inserted: Vec<&str> = after
        .lines()
        .filter(|l| !before.lines().any(|b| b == *l))
        .collect();
    assert_eq!(
        inserted,
        vec!["id = \"proj_fake0001\"", "  id = \"proj_fake0002\""]
    );
    // Everything else is byte for byte what it was.
    let without: String = after
        .split_inclusive('\n')
        .filter(|l| !inserted.contains(&l.trim_end_matches('\n')))
        .collect();
    assert_eq!(without, before);
    // Each id sits right under its project's name.
    assert!(after.contains(
        "name = \"CustomerChatbot-Prod\"   # shown in reports\nid = \"proj_fake0001\"\n# Cost allocation tags"
    ));
    assert!(
        after
            .contains("  name = \"Search\"\n  id = \"proj_fake0002\"\n  # tags in their own table")
    );
    // And the rewritten file is a valid config now, ids and all.
    let config = Config::load(&path).expect("valid config after apply");
    assert_eq!(config.projects[2].id.as_deref(), Some("proj_fake0002"));
}

#[tokio::test]
async fn tags_are_added_changed_and_removed() {
    let (base, fake) = spawn_fake(
        vec![
            default_project(),
            project(
                "proj_a",
                "A",
                &[("Team", "Old"), ("Legacy", "yes"), ("Keep", "1")],
            ),
        ],
        2,
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        &dir,
        &format!(
            "{}\n[[projects]]\nname = \"A\"\nid = \"proj_a\"\ntags = {{ Team = \"New\", Keep = \"1\", Env = \"Production\" }}\n",
            head(&base)
        ),
    );
    let before = std::fs::read_to_string(&path).expect("read");
    let api = api(&base);
    let (plan, text) = plan_text(&api, &path, false).await;
    assert!(plan.has_changes());
    assert!(text.contains("~ update tags \"A\" (proj_a)"), "{text}");
    assert!(text.contains("~ \"Team\" = \"Old\" -> \"New\""), "{text}");
    assert!(text.contains("+ \"Env\" = \"Production\""), "{text}");
    assert!(text.contains("- \"Legacy\""), "{text}");

    apply_text(&api, &path, false).await.expect("apply");
    let calls = mutations(&fake);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].path, "/v1/organization/projects/proj_a");
    assert_eq!(
        calls[0].body,
        json!({"add_tags": {"Env": "Production", "Team": "New"}, "remove_tag_keys": ["Legacy"]})
    );
    assert_eq!(
        upstream_tags(&fake, "proj_a"),
        json!({"Team": "New", "Keep": "1", "Env": "Production"})
    );
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        before,
        "no ids to write"
    );
}

#[tokio::test]
async fn the_listing_follows_every_page_and_ignores_archived_projects() {
    let mut upstream = vec![default_project()];
    for i in 1..=6 {
        upstream.push(project(
            &format!("proj_p{i}"),
            &format!("P{i}"),
            &[("Team", "T")],
        ));
    }
    let mut archived = project("proj_old", "Old", &[("Team", "T")]);
    archived["status"] = json!("archived");
    archived["archived_at"] = json!(1_786_614_394);
    upstream.push(archived);
    let (base, fake) = spawn_fake(upstream, 2).await;
    // This fake lists archived projects too: mantlegate must filter them itself.
    fake.lock().expect("lock").list_archived = true;

    let listed = api(&base).list().await.expect("list");
    assert_eq!(listed.len(), 8);
    let gets: Vec<Call> = fake.lock().expect("lock").calls.clone();
    assert_eq!(gets.len(), 4, "8 projects, 2 per page: {gets:?}");
    assert!(
        gets.iter()
            .all(|c| c.query.get("limit").map(String::as_str) == Some("100"))
    );
    let afters: Vec<Option<&str>> = gets
        .iter()
        .map(|c| c.query.get("after").map(String::as_str))
        .collect();
    assert_eq!(
        afters,
        vec![None, Some("proj_p1"), Some("proj_p3"), Some("proj_p5")]
    );

    // The project on the last page is found (no update), and the archived id is not an
    // existing project: it is created again.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut text = head(&base);
    for i in 1..=6 {
        let _ = write!(
            text,
            "\n[[projects]]\nname = \"P{i}\"\nid = \"proj_p{i}\"\ntags = {{ Team = \"T\" }}\n"
        );
    }
    text.push_str("\n[[projects]]\nname = \"Old\"\nid = \"proj_old\"\ntags = { Team = \"T\" }\n");
    let path = write_config(&dir, &text);
    let (plan, out) = plan_text(&api(&base), &path, false).await;
    assert_eq!(plan.creates(), 1, "{out}");
    assert_eq!(plan.active_upstream, 7);
    assert!(out.contains("+ create \"Old\""), "{out}");
    assert!(
        out.contains("id proj_old is not an active project"),
        "{out}"
    );
    assert!(!out.contains("~ update"), "{out}");
}

#[tokio::test]
async fn unmanaged_projects_are_reported_and_archived_only_when_asked() {
    let (base, fake) = spawn_fake(
        vec![
            default_project(),
            project("proj_a", "A", &[("Team", "T")]),
            project("proj_stray", "Stray", &[]),
        ],
        2,
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        &dir,
        &format!(
            "{}\n[[projects]]\nname = \"A\"\nid = \"proj_a\"\ntags = {{ Team = \"T\" }}\n",
            head(&base)
        ),
    );
    let api = api(&base);

    let (plan, text) = plan_text(&api, &path, false).await;
    assert!(!plan.has_changes());
    assert!(
        text.contains("? unmanaged \"Stray\" (proj_stray)"),
        "{text}"
    );
    assert!(
        !text.contains("Default"),
        "the default project is never reported: {text}"
    );
    let out = apply_text(&api, &path, false).await.expect("apply");
    assert!(out.contains("no changes"), "{out}");
    assert!(mutations(&fake).is_empty());

    let (_, text) = plan_text(&api, &path, true).await;
    assert!(text.contains("- archive \"Stray\" (proj_stray)"), "{text}");
    let out = apply_text(&api, &path, true).await.expect("apply");
    assert!(out.contains("archived `Stray` (proj_stray)"), "{out}");
    let calls = mutations(&fake);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        calls[0].path,
        "/v1/organization/projects/proj_stray/archive"
    );

    let (_, text) = plan_text(&api, &path, true).await;
    assert!(
        text.contains("no changes: the account matches the config\n"),
        "{text}"
    );
}

#[tokio::test]
async fn a_second_apply_changes_nothing() {
    let (base, fake) = spawn_fake(
        vec![
            default_project(),
            project("proj_a", "A", &[("Team", "Old")]),
            project("proj_stray", "Stray", &[]),
        ],
        2,
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        &dir,
        &format!(
            "{}\n[[projects]]\nname = \"A\"\nid = \"proj_a\"\ntags = {{ Team = \"New\" }}\n\n[[projects]]\nname = \"B\" # new\ntags = {{ Team = \"B\" }}\n",
            head(&base)
        ),
    );
    let api = api(&base);
    let first = apply_text(&api, &path, true).await.expect("first apply");
    assert!(
        first.contains("apply complete: 1 created, 1 updated, 1 archived"),
        "{first}"
    );
    let changes = mutations(&fake).len();
    assert_eq!(changes, 3);
    let file = std::fs::read_to_string(&path).expect("read");

    let second = apply_text(&api, &path, true).await.expect("second apply");
    assert!(second.contains("no changes"), "{second}");
    assert_eq!(
        mutations(&fake).len(),
        changes,
        "the second apply made no changing call"
    );
    assert_eq!(std::fs::read_to_string(&path).expect("read"), file);
}

#[tokio::test]
async fn applying_past_the_project_quota_is_refused_before_any_call() {
    let mut upstream = vec![default_project()];
    for i in 1..=998 {
        upstream.push(project(&format!("proj_n{i:04}"), &format!("N{i}"), &[]));
    }
    let (base, fake) = spawn_fake(upstream, 100).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        &dir,
        &format!(
            "{}\n[[projects]]\nname = \"One\"\ntags = {{ Team = \"T\" }}\n\n[[projects]]\nname = \"Two\"\ntags = {{ Team = \"T\" }}\n",
            head(&base)
        ),
    );
    let before = std::fs::read_to_string(&path).expect("read");
    let mut out = Vec::new();
    let err = projects::apply_with(&api(&base), &path, false, &mut out)
        .await
        .expect_err("over the quota");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("999 active project(s) and the plan creates 2"),
        "{msg}"
    );
    assert!(msg.contains("1000 projects"), "{msg}");
    assert!(msg.contains("nothing was changed"), "{msg}");
    assert!(mutations(&fake).is_empty());
    assert_eq!(std::fs::read_to_string(&path).expect("read"), before);
}

#[tokio::test]
async fn policy_violations_stop_the_plan() {
    let (base, fake) = spawn_fake(vec![default_project()], 2).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        &dir,
        &format!(
            "{}\n[[projects]]\nname = \"NoTeam\"\ntags = {{ Env = \"prod\" }}\n\n[[projects]]\nname = \"Fine\"\ntags = {{ Team = \"T\" }}\n",
            head(&base)
        ),
    );
    let mut out = Vec::new();
    let err = projects::plan_with(&api(&base), &path, false, &mut out)
        .await
        .expect_err("policy violation");
    let msg = format!("{err:#}");
    // The entry's line in the file: its `tags` key.
    let line = std::fs::read_to_string(&path)
        .expect("read")
        .lines()
        .position(|l| l.starts_with("tags = { Env"))
        .expect("the tags line")
        + 1;
    assert!(
        msg.contains(&format!(
            "projects[0].tags (line {line}): project `NoTeam` lacks the required tag `Team`"
        )),
        "{msg}"
    );
    assert!(msg.contains("nothing was planned"), "{msg}");
    assert!(
        !msg.contains("has no id"),
        "missing ids are what plan is for: {msg}"
    );
    assert!(out.is_empty());
    assert!(
        fake.lock().expect("lock").calls.is_empty(),
        "no call at all"
    );
}

#[tokio::test]
async fn the_admin_key_is_required_and_never_the_inference_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        &dir,
        "[upstream]\nbase_url = \"https://bedrock-mantle.us-east-1.api.aws\"\napi_key_env = \"BEDROCK_API_KEY\"\n",
    );
    let config = projects::load_config(&path).expect("config");
    let err =
        Api::from_config(&config, |_| Some("inference-key".to_owned())).expect_err("no setting");
    let msg = err.to_string();
    assert!(msg.contains("admin_api_key_env"), "{msg}");
    assert!(
        msg.contains("inference key (BEDROCK_API_KEY) is not used"),
        "{msg}"
    );

    let path = write_config(
        &dir,
        &format!(
            "[upstream]\nbase_url = \"https://bedrock-mantle.us-east-1.api.aws\"\nadmin_api_key_env = \"{ADMIN_ENV}\"\n"
        ),
    );
    let config = projects::load_config(&path).expect("config");
    let err = Api::from_config(&config, |_| None).expect_err("variable unset");
    assert!(err.to_string().contains(ADMIN_ENV), "{err}");
    Api::from_config(&config, |v| (v == ADMIN_ENV).then(|| ADMIN_KEY.to_owned()))
        .expect("key found");
}

#[tokio::test]
async fn upstream_errors_stop_apply_and_say_what_was_done() {
    let (base, fake) = spawn_fake(vec![default_project()], 2).await;
    fake.lock().expect("lock").fail_create = Some("Boom".to_owned());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        &dir,
        &format!(
            "{}\n[[projects]]\nname = \"First\"\ntags = {{ Team = \"T\" }}\n\n[[projects]]\nname = \"Boom\"\ntags = {{ Team = \"T\" }}\n\n[[projects]]\nname = \"Never\"\ntags = {{ Team = \"T\" }}\n",
            head(&base)
        ),
    );
    let mut out = Vec::new();
    let err = projects::apply_with(&api(&base), &path, false, &mut out)
        .await
        .expect_err("the create of Boom fails");
    let msg = format!("{err:#}");
    assert!(msg.contains("cannot create project `Boom`"), "{msg}");
    assert!(msg.contains("500 Internal Server Error"), "{msg}");
    assert!(msg.contains("upstream exploded"), "{msg}");
    assert!(
        msg.contains("already done: created `First` (proj_fake0001)"),
        "{msg}"
    );
    assert_eq!(mutations(&fake).len(), 2, "stopped at the failure");
    // The project that was created keeps its id, so the next apply does not create it again.
    let file = std::fs::read_to_string(&path).expect("read");
    assert!(
        file.contains("name = \"First\"\nid = \"proj_fake0001\"\n"),
        "{file}"
    );
    assert!(!file.contains("proj_fake0002"));

    // An OpenAI-shaped error: the message is shown, with the status.
    let wrong_key = Api::new(&base, "not-the-admin-key").expect("api");
    let mut out = Vec::new();
    let err = projects::plan_with(&wrong_key, &path, false, &mut out)
        .await
        .expect_err("401");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("401 Unauthorized: Invalid API key provided"),
        "{msg}"
    );
}

#[test]
fn the_overview_lists_keys_routes_and_spend_per_project() {
    let config = Config::from_toml(&format!(
        r#"
[upstream]
base_url = "https://bedrock-mantle.us-east-1.api.aws"
[attribution]
on_missing = "default"
default_project = "Chatbot"
[[projects]]
name = "Chatbot"
id = "proj_chat"
tags = {{ Team = "CX" }}
[[projects]]
name = "Search"
id = "proj_search"
[[keys]]
name = "chatbot-backend"
sha256 = "{}"
projects = ["Chatbot"]
[[keys]]
name = "chatbot-backend"
sha256 = "{}"
projects = ["Chatbot", "Search"]
[[keys]]
name = "search-team"
sha256 = "{}"
projects = ["Search"]
[[routes]]
prefix = "/chatbot"
project = "Chatbot"
[[routes]]
prefix = "/bot2"
project = "Chatbot"
"#,
        "a".repeat(64),
        "b".repeat(64),
        "c".repeat(64)
    ))
    .expect("config");
    let snapshot = Snapshot::build(&config, None).expect("snapshot");
    let spend = HashMap::from([
        (
            "proj_chat".to_owned(),
            projects::MonthSpend {
                cost_usd: Decimal::new(123_450, 4),
                unpriced_requests: 2,
            },
        ),
        (
            "proj_search".to_owned(),
            projects::MonthSpend {
                cost_usd: Decimal::ZERO,
                unpriced_requests: 3,
            },
        ),
    ]);
    let body = projects::overview(&snapshot, &spend);
    assert_eq!(
        body,
        json!({"object": "list", "data": [
            {"object": "mantlegate.project", "name": "Chatbot", "id": "proj_chat", "tags": {"Team": "CX"},
             "keys": ["chatbot-backend"], "routes": ["/bot2", "/chatbot"], "fallback": true,
             "month_to_date_usd": "12.345", "month_to_date_unpriced_requests": 2},
            {"object": "mantlegate.project", "name": "Search", "id": "proj_search", "tags": {},
             "keys": ["chatbot-backend", "search-team"], "routes": [], "fallback": false,
             "month_to_date_usd": null, "month_to_date_unpriced_requests": 3},
        ]})
    );
}

#[tokio::test]
async fn the_binary_prints_the_plan() {
    let (base, fake) = spawn_fake(
        vec![default_project(), project("proj_stray", "Stray", &[])],
        2,
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        &dir,
        &format!(
            "{}\n[[projects]]\nname = \"New\"\ntags = {{ Team = \"T\" }}\n",
            head(&base)
        ),
    );
    let before = std::fs::read_to_string(&path).expect("read");
    let run = |with_key: bool| {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mantlegate"));
            cmd.args(["projects", "plan", "--config"])
                .arg(&path)
                .env_remove(ADMIN_ENV);
            if with_key {
                cmd.env(ADMIN_ENV, ADMIN_KEY);
            }
            cmd.output().expect("run mantlegate")
        })
    };
    let output = run(true).await.expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("+ create \"New\""), "{stdout}");
    assert!(
        stdout.contains("? unmanaged \"Stray\" (proj_stray)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("plan: 1 to create, 0 to update, 0 to archive, 1 unmanaged"),
        "{stdout}"
    );
    assert!(mutations(&fake).is_empty());
    assert_eq!(std::fs::read_to_string(&path).expect("read"), before);

    let output = run(false).await.expect("join");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains(ADMIN_ENV), "{stderr}");
}

/// An id that would forge a line of the plan and colour the terminal if printed as sent.
const FORGING_ID: &str = "proj_x\n  + create \"Forged\"\u{1b}[31m";

/// What must never reach a terminal from the API: an escape character or a forged line.
fn assert_escaped(text: &str) {
    assert!(!text.contains('\u{1b}'), "a raw escape character: {text:?}");
    assert!(
        !text
            .lines()
            .any(|l| l.trim_start().starts_with("+ create \"Forged\"")),
        "a forged line: {text}"
    );
}

/// A config with one project to create (`New`) and one that exists (`Taken`, `proj_taken`).
fn create_one(dir: &tempfile::TempDir, base: &str) -> PathBuf {
    write_config(
        dir,
        &format!(
            "{}\n[[projects]]\nname = \"Taken\"\nid = \"proj_taken\"\ntags = {{ Team = \"T\" }}\n\n[[projects]]\nname = \"New\"\ntags = {{ Team = \"T\" }}\n",
            head(base)
        ),
    )
}

#[tokio::test]
async fn a_created_project_with_a_bad_or_taken_id_is_refused_and_never_written() {
    for bad in [
        "default",
        "garbage id",
        "proj_",
        "proj_taken",
        "proj_archived",
        FORGING_ID,
    ] {
        let mut archived = project("proj_archived", "Old", &[]);
        archived["status"] = json!("archived");
        let (base, fake) = spawn_fake(
            vec![
                default_project(),
                project("proj_taken", "Taken", &[("Team", "T")]),
                archived,
            ],
            10,
        )
        .await;
        fake.lock().expect("lock").list_archived = true;
        fake.lock().expect("lock").create_id = Some(bad.to_owned());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = create_one(&dir, &base);
        let before = std::fs::read_to_string(&path).expect("read");
        let mut out = Vec::new();
        let err = projects::apply_with(&api(&base), &path, false, &mut out)
            .await
            .expect_err(bad);
        let msg = format!("{err:#}");
        let out = String::from_utf8(out).expect("utf-8");
        assert!(msg.contains("cannot create project `New`"), "{msg}");
        assert!(msg.contains(&format!("{bad:?}")), "the id escaped: {msg}");
        assert!(msg.contains("not written to the config"), "{msg}");
        assert_escaped(&msg);
        assert_escaped(&out);
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            before,
            "{bad:?}"
        );
        assert_eq!(mutations(&fake).len(), 1, "one create, then stopped");
    }
}

#[tokio::test]
async fn a_listing_with_bad_or_repeated_ids_is_refused_before_any_change() {
    for listed in [
        vec![project("default", "Shadow", &[])],
        vec![project("garbage", "G", &[])],
        vec![project(FORGING_ID, "F", &[])],
        vec![project("proj_dup", "A", &[]), project("proj_dup", "B", &[])],
    ] {
        let mut upstream = vec![default_project()];
        upstream.extend(listed);
        let (base, fake) = spawn_fake(upstream, 10).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = create_one(&dir, &base);
        let before = std::fs::read_to_string(&path).expect("read");
        let mut out = Vec::new();
        let err = projects::apply_with(&api(&base), &path, true, &mut out)
            .await
            .expect_err("refused");
        let msg = format!("{err:#}");
        assert!(msg.contains("cannot list the account's projects"), "{msg}");
        assert_escaped(&msg);
        assert!(out.is_empty(), "no plan is printed");
        assert!(mutations(&fake).is_empty(), "no change");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), before);
    }
}

#[tokio::test]
async fn names_and_messages_from_the_api_are_printed_escaped() {
    let evil = "Evil\n  + create \"Forged\"\u{1b}[31m\u{202e}";
    let (base, fake) = spawn_fake(
        vec![
            default_project(),
            project("proj_taken", "Taken", &[("Team", "T")]),
            project("proj_evil", evil, &[("Team", evil)]),
        ],
        10,
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = create_one(&dir, &base);
    let (_, text) = plan_text(&api(&base), &path, true).await;
    assert_escaped(&text);
    assert!(!text.contains('\u{202e}'), "{text:?}");
    assert!(
        text.contains(r#"- archive "Evil\n  + create \"Forged\"\u001b[31m\u{202e}" (proj_evil)"#),
        "{text}"
    );

    fake.lock().expect("lock").listing = Listing::Error(evil.to_owned());
    let mut out = Vec::new();
    let err = projects::plan_with(&api(&base), &path, false, &mut out)
        .await
        .expect_err("400");
    let msg = format!("{err:#}");
    assert_escaped(&msg);
    assert!(
        msg.contains(r#"400 Bad Request: Evil\n  + create "Forged"\u{1b}[31m\u{202e}"#),
        "{msg}"
    );
}

#[tokio::test]
async fn an_answer_over_16_mib_is_refused() {
    assert_eq!(projects::MAX_ANSWER_BYTES, 16 << 20);
    let (base, fake) = spawn_fake(vec![default_project()], 10).await;
    fake.lock().expect("lock").listing = Listing::Huge;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = create_one(&dir, &base);
    let before = std::fs::read_to_string(&path).expect("read");
    let mut out = Vec::new();
    let err = projects::apply_with(&api(&base), &path, false, &mut out)
        .await
        .expect_err("too large");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("the answer is larger than 16777216 bytes"),
        "{msg}"
    );
    assert!(mutations(&fake).is_empty());
    assert_eq!(std::fs::read_to_string(&path).expect("read"), before);
}

#[tokio::test]
async fn a_stalled_answer_is_refused_after_the_call_timeout() {
    assert_eq!(projects::CALL_TIMEOUT, std::time::Duration::from_secs(30));
    let (base, fake) = spawn_fake(vec![default_project()], 10).await;
    fake.lock().expect("lock").listing = Listing::Stalled;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = create_one(&dir, &base);
    let before = std::fs::read_to_string(&path).expect("read");
    let api = api(&base).with_call_timeout(std::time::Duration::from_millis(300));
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        projects::apply_with(&api, &path, false, &mut out),
    )
    .await
    .expect("refused well before 20 s")
    .expect_err("stalled");
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    let msg = format!("{err:#}");
    assert!(msg.contains("no whole answer within 0.3 s"), "{msg}");
    assert!(mutations(&fake).is_empty());
    assert_eq!(std::fs::read_to_string(&path).expect("read"), before);
}

#[tokio::test]
async fn the_binary_exits_1_on_a_forged_id_and_prints_it_escaped() {
    let (base, fake) = spawn_fake(
        vec![
            default_project(),
            project("proj_taken", "Taken", &[("Team", "T")]),
        ],
        10,
    )
    .await;
    fake.lock().expect("lock").create_id = Some(FORGING_ID.to_owned());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = create_one(&dir, &base);
    let before = std::fs::read_to_string(&path).expect("read");
    let output = tokio::task::spawn_blocking({
        let path = path.clone();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_mantlegate"))
                .args(["projects", "apply", "--config"])
                .arg(&path)
                .env(ADMIN_ENV, ADMIN_KEY)
                .output()
                .expect("run mantlegate")
        }
    })
    .await
    .expect("join");
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_escaped(&stdout);
    assert_escaped(&stderr);
    assert!(stderr.contains(&format!("{FORGING_ID:?}")), "{stderr}");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), before);
    assert_eq!(mutations(&fake).len(), 1);
}
