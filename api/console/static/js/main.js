// The console's entry point: sign-in, sign-out, and which view is shown.
import { current, signIn, signOut, whenExpired } from "./api.js";
import { explain, notice, replace } from "./dom.js";
import { showOperator } from "./operator.js";
import { showTenant } from "./tenant.js";

const $ = (id) => document.getElementById(id);
const status = $("status");

function say(kind, text) {
  replace(status, text ? notice(kind, text) : "");
}

function showSignedOut(message, kind = "info") {
  $("sign-in").hidden = false;
  $("tenant-view").hidden = true;
  $("operator-view").hidden = true;
  replace($("tenant-view"));
  replace($("operator-view"));
  $("who").hidden = true;
  say(kind, message);
  $("main").focus();
}

function showSignedIn(session, label) {
  $("sign-in").hidden = true;
  $("who").hidden = false;
  $("who-name").textContent = label;
  const view = $(session.kind === "tenant" ? "tenant-view" : "operator-view");
  view.hidden = false;
  say("", "");
  if (session.kind === "tenant") showTenant(view);
  else showOperator(view);
  $("main").focus();
}

async function submit(event, kind) {
  event.preventDefault();
  const form = event.currentTarget;
  const fields = Object.fromEntries(new FormData(form));
  const submitButton = form.querySelector("button[type=submit]");
  submitButton.disabled = true;
  say("info", "Signing in…");
  try {
    const session = await signIn(kind, fields);
    // The key or password is not kept: only the token, in memory.
    form.reset();
    showSignedIn(session, kind === "tenant" ? "Signed in with an API key" : `Signed in as ${fields.username}`);
  } catch (error) {
    say("error", `Sign-in failed. ${explain(error)}`);
  } finally {
    submitButton.disabled = false;
  }
}

$("tenant-sign-in").addEventListener("submit", (event) => submit(event, "tenant"));
$("operator-sign-in").addEventListener("submit", (event) => submit(event, "operator"));
$("sign-out").addEventListener("click", async () => {
  if (current() === null) return showSignedOut("");
  try {
    await signOut();
    showSignedOut("Signed out. The token this page held has been revoked.", "ok");
  } catch (error) {
    showSignedOut(`Signed out here, but the server did not confirm the revocation: ${explain(error)}`, "error");
  }
});
whenExpired((message) => showSignedOut(message, "error"));
