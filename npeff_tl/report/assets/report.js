// npeff_tl report: sortable tables and expand/collapse of component sections. No network, no libraries.
(function () {
  "use strict";
  function cellValue(row, index) {
    var text = row.cells[index].getAttribute("data-value");
    if (text === null) { text = row.cells[index].textContent.trim(); }
    var number = parseFloat(text);
    return isNaN(number) ? text.toLowerCase() : number;
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("th.sortable").forEach(function (header, index) {
      var descending = true;
      header.addEventListener("click", function () {
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = cellValue(a, index), y = cellValue(b, index);
          if (x === y) { return 0; }
          if (x === "-" || x === "") { return 1; }
          if (y === "-" || y === "") { return -1; }
          return (x < y ? -1 : 1) * (descending ? -1 : 1);
        });
        rows.forEach(function (row) { body.appendChild(row); });
        descending = !descending;
      });
    });
  });
  document.querySelectorAll("[data-toggle-components]").forEach(function (button) {
    button.addEventListener("click", function () {
      var open = button.getAttribute("data-toggle-components") === "open";
      document.querySelectorAll("details.component:not(.heatmap)").forEach(function (d) { d.open = open; });
    });
  });
  function openTarget() {  // a link to a component card (from a plot dot or a heatmap row) opens it
    var id = decodeURIComponent(location.hash.slice(1));
    var target = id && document.getElementById(id);
    if (target && target.tagName === "DETAILS") { target.open = true; target.scrollIntoView(); }
  }
  window.addEventListener("hashchange", openTarget);
  document.addEventListener("click", function (event) {  // also when the link names the hash already shown
    var link = event.target.closest && event.target.closest("a[href^='#']");
    var target = link && document.getElementById(decodeURIComponent(link.getAttribute("href").slice(1)));
    if (target && target.tagName === "DETAILS") { target.open = true; }
  });
  openTarget();
  document.body.setAttribute("data-report-ready", "true");
}());
