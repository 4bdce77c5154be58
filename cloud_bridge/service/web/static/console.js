// The console's only script of its own (the page works without it, except that the setup code must then
// be typed in): the setup link carries its one-time code after "#", which never reaches the server's
// logs; move it into the form field and drop it from the address bar.
document.addEventListener("DOMContentLoaded", function () {
  var code = document.getElementById("code");
  if (code && window.location.hash.length > 1 && !code.value) {
    code.value = decodeURIComponent(window.location.hash.slice(1));
    window.history.replaceState(null, "", window.location.pathname);
    var pw = document.getElementById("password");
    if (pw) { pw.focus(); }
  }
});
