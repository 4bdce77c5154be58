// The warning before the session ends (session_pages.py): ask the service how long the session has left
// (asking is not use), show the dialog `warn_s` before the end with a countdown, "Stay signed in" extends
// the session (an authenticated POST with the CSRF token), and when the time is up go to the login page.
(function () {
  "use strict";
  var dialog, count, stay, note, timer = null, tick = null, deadline = 0;

  function csrf() {
    var m = document.querySelector('meta[name="cb-csrf"]');
    return m ? m.getAttribute("content") : "";
  }

  function toLogin() {
    window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname).replace(/%2F/g, "/"));
  }

  function schedule(fn, seconds) {
    if (timer !== null) { window.clearTimeout(timer); }
    timer = window.setTimeout(fn, Math.max(0, seconds) * 1000);
  }

  function answer(r) {  // a JSON answer, or null when the session has ended (the login page instead)
    if (!r.ok || (r.headers.get("content-type") || "").indexOf("application/json") !== 0) { return null; }
    return r.json();
  }

  function left() {
    return window.fetch("/panels/session", {credentials: "same-origin", redirect: "manual",
                                            headers: {"Accept": "application/json"}}).then(answer);
  }

  function close() {
    if (tick !== null) { window.clearInterval(tick); tick = null; }
    if (dialog.open) { dialog.close(); }
  }

  function show(s) {
    deadline = Date.now() + s.remaining * 1000;
    stay.hidden = !s.extendable;
    note.textContent = s.extendable ? "" : "It has reached its time limit: save your work and log in again.";
    var update = function () {
      var n = Math.max(0, Math.ceil((deadline - Date.now()) / 1000));
      count.textContent = String(n);
      if (n <= 0) { close(); check(); }
    };
    update();
    if (tick === null) { tick = window.setInterval(update, 1000); }
    if (!dialog.open) { dialog.showModal(); if (!stay.hidden) { stay.focus(); } }
  }

  function react(s) {
    if (s === null || s.remaining <= 0) { close(); toLogin(); return; }
    if (s.remaining > s.warn_s) {  // used meanwhile (another page or tab): look again nearer the end
      close();
      schedule(check, s.remaining - s.warn_s);
      return;
    }
    show(s);
    schedule(check, s.remaining + 0.5);
  }

  function check() {
    left().then(react, function () { schedule(check, 5); });
  }

  function extend() {
    window.fetch("/session/extend", {method: "POST", credentials: "same-origin", redirect: "manual",
                                     headers: {"X-CSRF-Token": csrf(), "Accept": "application/json"}})
      .then(answer).then(react, function () { schedule(check, 5); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    dialog = document.getElementById("session-warning");
    if (!dialog || typeof dialog.showModal !== "function") { return; }
    count = document.getElementById("session-seconds");
    stay = document.getElementById("session-stay");
    note = document.getElementById("session-note");
    stay.addEventListener("click", function (e) { e.preventDefault(); extend(); });
    check();
  });
})();
